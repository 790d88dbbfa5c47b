"""Entry point. Imports only typer/rich and the command modules (which import heavy libraries lazily)."""

from __future__ import annotations

import sys

import typer

from snexport import __version__

app = typer.Typer(
    name="snexport",
    help="Stitch a family of pretrained ViTs (SN-Net), keep the Pareto-optimal stitches, export each as ONNX or a "
    "TensorRT engine, profile them on the target device and write the manifest an on-device selector reads.\n\n"
    "Typical use: `snexport build` (demo family, this machine) or "
    "`snexport build --anchors deit_s,deit_b --target jetson-orin`, then `snexport bench` on the device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"snexport {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def _register() -> None:
    from snexport.cli import cmd_evaluate, cmd_plan, cmd_stitch, cmd_train

    for module in (cmd_plan, cmd_stitch, cmd_train, cmd_evaluate):
        module.register(app)
    try:
        from snexport.cli import cmd_select, cmd_export  # noqa: F401
    except ImportError:
        return
    for module in (cmd_select, cmd_export):
        module.register(app)
    try:
        from snexport.cli import cmd_bench, cmd_build, cmd_bundle  # noqa: F401
    except ImportError:
        return
    for module in (cmd_bench, cmd_bundle, cmd_build):
        module.register(app)


_register()


def main() -> None:
    from rich.markup import escape

    from snexport.errors import SnexportError

    try:
        app()
    except SnexportError as exc:
        from snexport.cli.common import err

        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True)  # escaped: "pip install 'snexport[ort]'"
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:  # a host-only command in a device-only install: say which extra
        from snexport.cli.common import err, missing_extra

        hint = missing_extra(exc)
        if hint is None:
            raise
        err.print(f"[bold red]error:[/] {escape(hint)}", markup=True, highlight=False)
        sys.exit(1)
    except OSError as exc:  # a disk that refused a write mid-command (full, read-only): the environment, not a bug
        from snexport.buildfiles import STORAGE_ERRNOS, storage_error
        from snexport.cli.common import err

        if exc.errno not in STORAGE_ERRNOS:
            raise
        where = exc.filename or "the output directory"
        err.print(f"[bold red]error:[/] {storage_error(exc, where, 'this command writes there')}", markup=True,
                  highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        from snexport.cli.common import err

        err.print("[red]interrupted[/]: finished work is kept; re-run the same command to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()
