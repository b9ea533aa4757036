"""bida.progress: tqdm on a terminal, a few plain lines on a file or pipe."""

from __future__ import annotations


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
