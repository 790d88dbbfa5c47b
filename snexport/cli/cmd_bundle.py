"""`snexport bundle`: what a device needs from a build, in one folder; `snexport merge`: its measurements back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from snexport.cli.common import out


def bundle_cmd(
    build_dir: Annotated[Path, typer.Argument(help="Build directory with an export (`snexport export`).")],
    out_dir: Annotated[Path, typer.Argument(help="New folder for the bundle (must not exist, or be empty).")],
    target: Annotated[Optional[str], typer.Option(help="Device profile name or TOML path the bundle is for; "
                                                  "default: the build's target.")] = None,
    tar: Annotated[bool, typer.Option("--tar", help="Also write OUT.tar.gz (one file to copy to the device).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
):
    """Copy the manifest, the engines or shared-weight pack, and the device profile into OUT, hashes checked.

    On the device: `pip install "snexport[ort]"` (or `[tensorrt]`), then `snexport bench OUT`; the selector reads
    OUT/manifest.json. Bring the measurements home with `snexport merge OUT BUILD`.
    """
    from snexport.cli.common import print_json
    from snexport.device.bundle import write_bundle

    profile = None
    if target is not None:
        from snexport.device.profiles import load_profile

        profile = load_profile(target)
    result = write_bundle(build_dir, out_dir, profile, tar=tar)
    if as_json:
        print_json({k: str(v) if isinstance(v, Path) else v for k, v in result.items()})
        return
    out.print(f"bundle: {result['bundle']} ({result['engines']} engines for {result['profile']}, "
              f"{result['files']} files, {result['bytes'] / 1e6:.1f} MB; SN-Net weights left out: "
              f"{result['left_out_bytes'] / 1e6:.1f} MB)")
    if result["tarball"]:
        out.print(f"tarball: {result['tarball']}")
    out.print(f"on the device: snexport bench {result['bundle'].name}; then here: snexport merge "
              f"{result['bundle'].name} {build_dir}")


def merge_cmd(
    bundle_dir: Annotated[Path, typer.Argument(help="A bundle (or a device's copy of the build) after "
                                               "`snexport bench`.")],
    build_dir: Annotated[Path, typer.Argument(help="The host build directory the bundle was made from.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print what was merged as JSON.")] = False,
):
    """Merge a device's measurements into the build: profile.jsonl lines and the manifest's measurements."""
    from snexport.buildfiles import MANIFEST
    from snexport.cli.common import print_json
    from snexport.device.bundle import merge_bundle

    result = merge_bundle(bundle_dir, build_dir)
    if as_json:
        print_json(result)
        return
    for key, ids in result["engines"].items():
        out.print(f"{key}: {len(ids)} engines merged into {Path(build_dir) / MANIFEST}")
    if result["unmatched"]:
        out.print(f"not merged (made from another export): {', '.join(result['unmatched'])}")


def register(app: typer.Typer) -> None:
    app.command("bundle")(bundle_cmd)
    app.command("merge")(merge_cmd)
