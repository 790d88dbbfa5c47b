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
        from snexport.cli import cmd_bench, cmd_build  # noqa: F401
    except ImportError:
        return
    for module in (cmd_bench, cmd_build):
        module.register(app)


_register()


def main() -> None:
    from snexport.errors import SnexportError

    try:
        app()
    except SnexportError as exc:
        from snexport.cli.common import err

        err.print(f"[bold red]error:[/] {exc}", markup=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        from snexport.cli.common import err

        err.print("[red]interrupted[/]: finished work is kept; re-run the same command to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()
