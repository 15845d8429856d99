"""``ncfast info``: the build (extension, CUDA kernels, architectures, versions) and the backend."""

from __future__ import annotations

import json

import click

from ncfast.cli import main


@main.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as one JSON object.")
def info_command(as_json: bool) -> None:
    """Show whether the native extension is built (and with CUDA kernels for which GPU
    architectures), the torch and CUDA versions, and which backend ncfast uses."""
    from ncfast.backend.build_info import build_info

    info = build_info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    lines = [
        f"ncfast: {info['ncfast']}",
        f"torch: {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        "GPUs: " + (", ".join(info["devices"]) if info["devices"] else "none visible"),
    ]
    if info["extension"]:
        lines.append(f"native extension: present ({info['extension_path']})")
        lines.append(
            f"  built against torch {info['extension_torch']}, {info['extension_compiler']}"
        )
        if info["extension_cuda"]:
            images = [i for i in (info["extension_arch_list"] or "").split(";") if i]
            sass = ", ".join(i for i in images if not i.startswith("compute_")) or "none"
            ptx = ", ".join(i for i in images if i.startswith("compute_")) or "none"
            lines.append(
                f"  CUDA kernels: compiled (CUDA {info['extension_cuda_version']}), machine code "
                f"for {sass}; PTX {ptx}"
            )
        else:
            lines.append("  CUDA kernels: not compiled (CUDA tensors use the reference)")
    else:
        lines.append(f"native extension: absent ({info['extension_error']})")
    for entry in info["device_kernels"]:
        lines.append(
            f"{entry['device']} ({entry['name']}, compute capability {entry['capability']}): "
            f"{entry['uses']}"
        )
    for entry in info["stats_precision"]:
        lines.append(
            f"scatter precision on {entry['device']}: auto = {entry['auto']} ({entry['why']})"
        )
    backend = info["backend"]
    if info["backend_requested"]:
        backend += f" (NCFAST_BACKEND={info['backend_requested']})"
    elif info["native_unavailable_reason"]:
        backend += f" (native unavailable: {info['native_unavailable_reason']})"
    lines.append(f"active backend: {backend}")
    click.echo("\n".join(lines))
