"""bida.engine.runlog: device-side log sums, log.jsonl records and reading them back on resume."""

from __future__ import annotations

import json
import math

import torch

from bida.engine.runlog import LOG_DISCARDED, LogAccumulator, RunLogger, log_has, logged_steps, truncate_log


def test_accumulator_means_leave_out_non_finite_values_and_survive_a_state_round_trip():
    acc = LogAccumulator()
    acc.add({"loss": torch.tensor(1.0), "acc": torch.tensor(float("nan")), "lr": 0.5})
    acc.add({"loss": torch.tensor(3.0), "acc": torch.tensor(0.25), "lr": 1.5})
    copy = LogAccumulator()
    copy.load_state_dict(acc.state_dict())
    acc.add({"loss": torch.tensor(5.0), "acc": torch.tensor(0.75), "lr": float("inf")})
    copy.add({"loss": torch.tensor(5.0), "acc": torch.tensor(0.75), "lr": float("inf")})
    for a in (acc, copy):
        assert a.steps == 3
        assert a.means() == {"loss": 3.0, "acc": 0.5, "lr": 1.0}
        assert a.means() == {} and a.steps == 0  # reset
    acc.add({"x": torch.tensor(float("nan"))})
    assert math.isnan(acc.means()["x"])


def test_logger_writes_host_values_and_the_log_reads_back(tmp_path):
    logger = RunLogger(tmp_path, enabled=True)
    try:
        logger.log({"loss": torch.tensor(0.5), "round": 0}, step=1)
        logger.log({"loss": 0.25}, step=2)
        logger.log({"loss": 0.125, "eval/mIoU": 0.5}, step=3)
    finally:
        logger.close()
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0]) == {"step": 1, "loss": 0.5, "round": 0}
    RunLogger(tmp_path / "nowhere", enabled=False).log({"loss": 1.0}, step=1)  # off rank 0: writes nothing
    assert not (tmp_path / "nowhere").exists()
    assert logged_steps(tmp_path) == [1, 2, 3]
    assert log_has(tmp_path, lambda r: "eval/mIoU" in r) and not log_has(tmp_path, lambda r: r["step"] == 9)


def test_truncate_moves_later_and_torn_records_and_destroys_none(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo\n')
    assert truncate_log(tmp_path, 2) == 2
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert (tmp_path / LOG_DISCARDED).read_text() == '{"step": 3}\n{"step": 4, "lo\n'
    assert truncate_log(tmp_path, 2) == 0 and truncate_log(tmp_path / "none", 0) == 0


# ---------------------------------------------------------------- progress on a terminal, a file or a pipe

def test_progress_on_a_file_is_a_few_plain_lines():
    # before: tqdm redrew its bar with carriage returns into a log file (one make demo > file: 128 KB)
    import io

    from bida.progress import PlainProgress

    out = io.StringIO()
    bar = PlainProgress(total=20, desc="bida", stream=out)
    for step in range(1, 21):
        bar.set_postfix(loss=f"{1 / step:.3f}")
        bar.update(1)
    bar.close()  # the last update wrote the final line: nothing more
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10  # one at each tenth of 20 steps
    assert [ln.split(",")[0] for ln in lines] == [f"bida: {n}/20 ({5 * n:.0f}%)" for n in range(2, 21, 2)]
    assert lines[-1].endswith("loss=0.050")
    # resumed at step 7 of 100, updated by hand to 9: no tenth crossed, the line comes on close
    out = io.StringIO()
    bar = PlainProgress(total=100, initial=7, stream=out)
    bar.update(1)
    bar.update(1)
    assert out.getvalue() == ""
    bar.close()
    assert [ln.split(",")[0] for ln in out.getvalue().splitlines()] == ["progress: 9/100 (9%)"]
    # a transient bar (an evaluation, a pass): nothing when it is short, as it vanishes from a terminal
    out = io.StringIO()
    bar = PlainProgress(range(50), desc="evaluate", stream=out, transient=True)
    assert list(bar) == list(range(50)) and bar.n == 50
    bar.close()
    assert out.getvalue() == ""


def test_progress_bar_is_tqdm_on_a_terminal_only(monkeypatch):
    import sys

    from tqdm import tqdm

    from bida.progress import PlainProgress, progress_bar

    class Terminal:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Terminal(True))
    bar = progress_bar(range(3), desc="x")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    bar.close()
    monkeypatch.setattr(sys, "stderr", Terminal(False))
    bar = progress_bar(range(3), desc="x")
    assert isinstance(bar, PlainProgress) and list(bar) == [0, 1, 2] and bar.n == 3
    assert isinstance(progress_bar(range(3), disable=True), tqdm)  # disabled: tqdm's no-op bar, as before
