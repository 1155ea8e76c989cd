"""The small subcommands: tour, gradcheck, info."""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm import functional
from batchnorm.app import cli
from batchnorm.app.gradcheck import check_gradients


def test_tour_prints_the_seed_numbers(capsys):
    assert cli.main(["tour"]) == 0
    out = capsys.readouterr().out
    assert "-1.2247425750014138" in out and "0.4898970300005655" in out
    assert "num_batches_tracked: 20" in out


def test_gradcheck_passes_on_correct_gradients(capsys):
    assert cli.main(["gradcheck", "5,3", "3,2,4", "--points", "8"]) == 0
    assert "all errors below" in capsys.readouterr().out


def test_gradcheck_catches_a_wrong_gradient(monkeypatch, capsys):
    real = functional.batch_norm_backward

    def off_by_a_bit(dy, cache):
        dx, dw, db = real(dy, cache)
        return dx * 1.01, dw, db

    monkeypatch.setattr(functional, "batch_norm_backward", off_by_a_bit)
    assert check_gradients((6, 2)).finite_diff_error > 1e-4
    assert cli.main(["gradcheck", "6,2", "--points", "4"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_gradcheck_eval_mode_and_channels_last():
    result = check_gradients((3, 4, 2), axis=-1, training=False)
    assert result.finite_diff_error < 1e-6 and np.isnan(result.reference_error)


def test_bad_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["gradcheck", "7"])
    assert exc.value.code == 2
    assert "needs 2+ positive sizes" in capsys.readouterr().err
    assert cli.main(["gradcheck", "4,3", "--axis", "5"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_info(capsys):
    from batchnorm.kernels import buffers

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends installed" in out
    assert f"kept now: {buffers.kept_bytes()} bytes" in out


def test_info_shows_the_kernel_cache(capsys):
    pytest.importorskip("numba")
    from batchnorm import kernels

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "compiled-kernel cache:" in out
    assert str(kernels.cache_info()["directory"]) in out
    assert "threading layer " in out


def test_entry_ignores_a_ctrl_c_after_the_work_is_done(monkeypatch):
    """The console script's exit status is main's, not death by a late SIGINT."""
    import signal

    monkeypatch.setattr(cli, "main", lambda: 7)
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert cli.entry() == 7
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
