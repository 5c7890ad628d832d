"""Windows and macOS, as far as this Linux machine can check them, and the GPU warning.

Windows has no ``fcntl``: every module must import without it and the local commands
must load; ``serve`` must refuse the embedded stack there with a clear message.
Real Windows and macOS runs are not part of this suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.packaging.extras import PROMISED, SRC

LOCAL_COMMANDS = ["train", "infer", "export", "status", "demo", "init-model"]


def _run(code: str, tmp_path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )


def test_everything_imports_and_the_local_commands_load_without_fcntl(tmp_path):
    modules = sorted({m for mods in PROMISED.values() for m in mods if "cellpose_finetuning" in m})
    code = f"""
        import sys
        sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
        import importlib
        for name in {modules!r}:
            importlib.import_module(name)
        try:
            import fcntl
        except ImportError:
            pass
        else:
            raise SystemExit("fcntl still importable")
        from click.testing import CliRunner
        from cellpose_finetuning.cli import main
        for command in {LOCAL_COMMANDS!r}:
            result = CliRunner().invoke(main, [command, "--help"])
            assert result.exit_code == 0, (command, result.output)
            assert "Usage:" in result.output
        print("ok", len({modules!r}))
    """
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", str(len(modules))]


def test_the_stack_lock_works_without_fcntl(tmp_path):
    """filelock falls back to a lock file when fcntl is missing; a second holder is refused."""
    code = f"""
        import sys
        sys.modules["fcntl"] = None
        from cellpose_finetuning.deploy.stack import EmbeddedStack, StackConfig, StackError
        a = EmbeddedStack(StackConfig(data_dir={str(tmp_path)!r}))
        b = EmbeddedStack(StackConfig(data_dir={str(tmp_path)!r}))
        a._acquire_lock()
        try:
            b._acquire_lock()
        except StackError as exc:
            print("refused:", exc)
        a._release_lock()
        b._acquire_lock()
        b._release_lock()
    """
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("refused: another stack is running on")


def test_serve_on_windows_says_the_embedded_stack_is_unsupported(tmp_path):
    code = f"""
        import asyncio  # imported as on Linux (on "win32" it wants _overlapped)
        import sys
        from click.testing import CliRunner
        from cellpose_finetuning.cli import main
        sys.platform = "win32"  # after the imports: only our own check reads it
        result = CliRunner().invoke(main, ["serve", "--data-dir", {str(tmp_path / "d")!r}])
        print(result.exit_code)
        print(result.output)
    """
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    code_line, *output = result.stdout.splitlines()
    assert code_line == "2"  # the CLI's exit code for a user error
    text = " ".join(output)
    assert "runs on Linux and macOS only" in text and "--server-url" in text, text
    assert not (tmp_path / "d" / "s3").exists()  # nothing was started


def test_check_platform_refuses_windows_only():
    from cellpose_finetuning.deploy.stack import StackError, check_platform

    check_platform("linux")
    check_platform("darwin")
    with pytest.raises(StackError, match="WSL"):
        check_platform("win32")


# ----------------------------------------------------------------------------- GPU warning
def test_no_gpu_no_warning():
    from cellpose_finetuning.engine.devices import unused_gpu_reason

    assert unused_gpu_reason(signs=[]) is None


def test_a_gpu_torch_cannot_use_is_named_with_the_reason():
    import torch

    from cellpose_finetuning.engine.devices import unused_gpu_reason

    reason = unused_gpu_reason(signs=["/dev/nvidia0"])
    if torch.cuda.is_available():  # a machine whose torch uses its GPU
        assert reason is None
    else:
        assert reason is not None
        assert f"torch {torch.__version__}" in reason and "/dev/nvidia0" in reason
        assert "14-20x slower" in reason
        expected = "CPU-only build" if torch.version.cuda is None else "cannot use it:"
        assert expected in reason


def test_pick_device_warns_instead_of_falling_back_silently(monkeypatch):
    import torch

    from cellpose_finetuning.engine import devices
    from cellpose_finetuning.engine.models import pick_device

    if torch.cuda.is_available():
        assert pick_device().type == "cuda"
        return
    monkeypatch.setattr(devices, "gpu_signs", lambda: ["/dev/nvidia0"])
    devices.warn_if_gpu_unused.cache_clear()
    try:
        with pytest.warns(devices.GpuUnusedWarning, match="a GPU is present"):
            assert pick_device().type in ("cpu", "mps")
    finally:
        devices.warn_if_gpu_unused.cache_clear()
