"""Progress on a terminal and in a log: messages printed while a bar runs go above it (the bar is
never cut, and the screen ends with one final bar); in a log a short run still ends with a line
holding its loss. The terminal is emulated: carriage returns, newlines and tqdm's clearing."""
import contextlib
import io
import sys

from engine.runtime import progress
from engine.runtime.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def screen(raw: str) -> list:
    """The lines a terminal shows after `raw`: '\\r' returns to the start of the line (later text
    overwrites), '\\n' starts the next; ANSI escapes (tqdm's cursor moves) are dropped."""
    import re

    raw = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", raw)
    lines, row, col = [[]], 0, 0
    for ch in raw:
        if ch == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
        elif ch == "\r":
            col = 0
        else:
            line = lines[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = ch
            col += 1
    return [s for s in ("".join(line).rstrip() for line in lines) if s]


@contextlib.contextmanager
def on_a_terminal():
    """sys.stdout and sys.stderr as one terminal (inside the test: pytest resets them between phases)."""
    term, saved = FakeTerminal(), (sys.stdout, sys.stderr)
    sys.stdout = sys.stderr = term
    try:
        yield term
    finally:
        sys.stdout, sys.stderr = saved


def test_messages_go_above_the_bar_and_one_final_bar_stays():
    with on_a_terminal() as terminal:
        bar = Progress(30, "training", "steps")
        for step in range(1, 31):
            bar.update(1, loss=f"{1 / step:.4f}")
            if step == 3:
                print("decode: eager decode step", file=sys.stderr, flush=True)  # a message from another module
            if step % 10 == 0:
                print(f"[step {step}] eval accuracy 0.5", flush=True)  # the trainer's evaluation line, on stdout
        bar.close()
        given_back = sys.stdout is terminal and sys.stderr is terminal
    shown = screen(terminal.getvalue())
    assert shown[:-1] == ["decode: eager decode step", "[step 10] eval accuracy 0.5", "[step 20] eval accuracy 0.5",
                          "[step 30] eval accuracy 0.5"], shown
    assert shown[-1].startswith("training: 100%") and "30/30" in shown[-1] and "loss=0.0333" in shown[-1]
    assert given_back  # the streams are given back when the bar closes
    assert not progress._OPEN_BARS


def test_an_error_during_a_bar_is_the_last_line():
    """fail() closes the open bars first: the sentence is printed below the bar, not above a redrawn one."""
    import pytest

    from engine.runtime.cli import fail

    with on_a_terminal() as terminal:
        bar = Progress(10, "training", "steps")
        bar.update(4)
        with pytest.raises(SystemExit):
            fail("--train_file x.json record 3 has no 'instruction'")
        given_back = sys.stderr is terminal
    shown = screen(terminal.getvalue())
    assert shown[-1] == "error: --train_file x.json record 3 has no 'instruction'", shown
    assert shown[:-1] and all(line.startswith("training:  40%") for line in shown[:-1]), shown
    assert given_back and not progress._OPEN_BARS and bar.bar is not None


def test_a_short_run_in_a_log_ends_with_a_line_holding_its_loss():
    log = io.StringIO()
    bar = Progress(5, "training", "steps", stream=log)
    for _ in range(5):
        bar.update(1)
    bar.update(0, loss="1.2345")
    bar.close()
    assert log.getvalue().splitlines() == [log.getvalue().strip()]
    assert log.getvalue().startswith("training: 5/5 steps (100%), ") and log.getvalue().strip().endswith("loss 1.2345")
    quick = io.StringIO()  # a conversion's quick loop (leave=False) is not worth a line
    bar = Progress(3, "writing", "tensor", stream=quick, leave=False)
    bar.update(3)
    bar.close()
    assert quick.getvalue() == ""


def test_training_on_a_terminal_reads_cleanly(tmp_path, tiny_tokenizer, dist1):
    """A real run: its evaluation lines and the decode path's note above one final bar."""
    import checkpoint_split as cks
    import train
    from data.arithmetic import main as make_arith

    make_arith(str(tmp_path / "data"), n_train=24, n_test=4, style="fixed", min_value=10)
    cks.init("tiny-llama", str(tmp_path / "m"), tokenizer=tiny_tokenizer, seed=1)
    with on_a_terminal() as terminal:
        train.main(task="ARITH", ckpt_dir=str(tmp_path / "m"), save_dir=str(tmp_path / "s"),
                   train_file=str(tmp_path / "data" / "train.json"), label_file=str(tmp_path / "data" / "test.json"),
                   template="none", max_seq_len=64, max_batch_size=4, max_steps=6, eval_every=3, max_new_tokens=6)
    shown = screen(terminal.getvalue())
    bars = [line for line in shown if line.startswith("training:")]
    assert len(bars) == 1 and shown[-1] == bars[0] and "6/6" in bars[0], shown
    assert [line.split(" eval")[0] for line in shown if " eval " in line] == ["[step 3]", "[step 6]"]
