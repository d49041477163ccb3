"""Each example on a tiny configuration: two training steps, a checkpoint saved and resumed,
then generation / classification, the plots and the summary.

The second run of each example resumes the first one's checkpoint without training further,
so what it holds after the restore can be compared with what was saved. Runs in one process
reuse the compiled steps (same model structure, same optimizer settings).
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

import jattn
from examples import char_lm, chatbot, classifier, plots
from examples.checkpoints import read_checkpoint
from examples.data import strip_gutenberg
from examples.fit import kernels_line
from examples.tasks import char_lm as char_lm_task
from examples.tasks import chatbot as chatbot_task
from examples.tasks import classifier as classifier_task
from examples.vocab import SPECIAL_TOKENS, train_subword_tokenizer


def flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict of arrays as {"a/b/0/c": array}; keys compared as strings (an orbax
    restore without a target names list entries "0", an NNX pure dict 0)."""
    if isinstance(tree, dict):
        out: dict[str, np.ndarray] = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): np.asarray(tree)}


def check_run_and_resume(module: Any, argv: list[str], out: Path) -> tuple[dict, dict]:
    ckpt = out / "ckpt"
    argv = [*argv, "--out-dir", str(out), "--no-progress", "--seed", "3"]
    first = module.run([*argv, "--steps", "2"])
    assert first.summary["step"] == 2
    assert first.summary["resumed_from"] is None
    assert np.isfinite(first.summary["val_loss"])

    saved, meta = read_checkpoint(ckpt)
    assert meta["step"] == 2
    assert int(saved["optimizer"]["step"]) == 2
    assert [v["step"] for v in meta["history"]["val"]] == [2]

    second = module.run([*argv, "--steps", "2", "--resume"])
    assert second.summary["resumed_from"] == 2
    assert second.trainer.step == 2
    restored = second.trainer.checkpoint_tree()
    want, got = flat(saved["params"]), flat(restored["params"])
    assert want.keys() == got.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    for name, value in flat(saved["optimizer"]).items():
        np.testing.assert_array_equal(flat(restored["optimizer"])[name], value, err_msg=name)
    # The validation loss of the restored model is the saved model's.
    assert second.summary["val_loss"] == pytest.approx(first.summary["val_loss"], rel=1e-6)

    for png in ("loss.png", "attention.png"):
        path = out / png
        assert path.stat().st_size > 1000, path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert written["step"] == 2
    return first.summary, second.summary


GUTENBERG = """The Project Gutenberg EBook of Something

*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***

Produced by Somebody

THE BOOK

{body}
End of the Project Gutenberg EBook of Something

*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***
licence text that must not be learnt
"""


def test_char_lm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = "the island rose out of the sea, and the engineer looked at it.\n" * 12
    text = tmp_path / "book.txt"
    text.write_text(GUTENBERG.format(body=body).replace("\n", "\r\n"), encoding="utf-8-sig")
    argv = [
        "--text", str(text), "--seq-len", "16", "--batch-size", "4",
        "--d-model", "16", "--layers", "1", "--heads", "2", "--dropout", "0.1",
        "--prompt", "the ", "--temperature", "0.8", "--gen-length", "8", "--top-k", "5",
    ]  # fmt: skip
    first, second = check_run_and_resume(char_lm, argv, tmp_path / "run")
    # --implementation auto (the default) says which kernel it ran: one for every layer
    ran = [
        line.rsplit(" ", 1)[1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("attention: --implementation auto runs ")
    ]
    assert len(ran) == 2  # once per run (the resumed one too)
    assert ran[0] == ran[1] and ran[0] in jattn.kernels.default_order(jax.default_backend(), 16, 16)
    # The same seed trains the same model (initialisation, batches and dropout masks).
    again_argv = [*argv, "--out-dir", str(tmp_path / "again"), "--no-progress", "--seed", "3"]
    again = flat(char_lm.run([*again_argv, "--steps", "2"]).trainer.checkpoint_tree()["params"])
    saved, _ = read_checkpoint(tmp_path / "run" / "ckpt")
    for name, value in flat(saved["params"]).items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
    assert first["characters"] == len("THE BOOK\n\n" + body)  # header and footer cut
    assert first["vocab_size"] == len(set("THE BOOK\n" + body))
    (sample,) = second["samples"]
    assert sample["temperature"] == 0.8 and sample["alpha"] == pytest.approx(1.25)
    assert sample["text"].startswith("the ") and len(sample["text"]) == 4 + 8
    assert set(sample["text"]) <= set("THE BOOK\n" + body)


def test_char_lm_default_text_and_alpha() -> None:
    args = char_lm.parse_args(["--alpha", "2", "4"])
    assert args.temperature == [0.5, 0.25]
    text, source = char_lm_task.load_text(args)
    assert source == "pydoc_data.topics" and len(text) > 100_000
    with pytest.raises(SystemExit):
        char_lm.parse_args(["--alpha", "2", "--temperature", "1"])


def test_char_lm_default_prompt_is_prose() -> None:
    args = char_lm.parse_args([])
    text, source = char_lm_task.load_text(args)
    data = char_lm_task.make_data(text, args.val_fraction, args.seq_len, None, source)
    prompt = char_lm_task.default_prompt(data)
    # the held-out text starts inside an indented code example: mostly spaces
    start = data.decode(data.val[:40])
    assert sum(c.isspace() for c in start) > 10
    assert 20 <= len(prompt) <= 40 and prompt[0].isalpha() and prompt == prompt.strip()
    assert sum(c.isspace() for c in prompt) <= len(prompt) // 4 and "  " not in prompt
    assert prompt in " ".join(data.decode(data.val).split())  # whole words of the held-out text
    # a text of one line without prose falls back to its start
    one_line = char_lm_task.CharData("ab ", np.array([0, 1]), np.array([0, 2, 1, 1, 0]))
    assert char_lm_task.default_prompt(one_line) == "a bba"


@pytest.mark.parametrize("module", [char_lm, chatbot, classifier])
def test_help_shows_the_defaults(module, capsys) -> None:
    defaults = module.parse_args([])
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    flags = ["--steps", "--seed", "--lr", "--batch-size"]  # --batch-size: no help text
    flags += [] if module is classifier else ["--d-model", "--heads"]  # no help text either
    for flag in flags:
        name = flag[2:].replace("-", "_")
        entry = shown.split(f" {flag} {name.upper()} ", 1)[1].split(" --", 1)[0]
        assert entry.endswith(f"(default: {getattr(defaults, name)})"), (flag, entry)


def test_strip_gutenberg_markers() -> None:
    text = "header\nTITLE\nbody\nFOOTER\nlicence\n"
    assert strip_gutenberg(text, start_marker="TITLE", end_marker="FOOTER") == ("TITLE\nbody\n")
    assert strip_gutenberg("no markers here\n") == "no markers here\n"


def test_chatbot_generated_task(tmp_path: Path) -> None:
    argv = [
        "--generated-pairs", "64", "--batch-size", "8", "--max-len", "12",
        "--d-model", "16", "--heads", "2", "--layers", "1", "--d-ff", "32",
        "--ask", "1 2 3", "4 5 6 7",
    ]  # fmt: skip
    first, second = check_run_and_resume(chatbot, argv, tmp_path / "run")
    assert first["data"] == "generated digit reversal"
    assert kernels_line(["cpu"] * 3) == "cpu"
    assert kernels_line(["fused", "flash", "fused"]) == "fused (2 calls), flash (1 call)"
    answers = second["answers"]
    assert [a["question"] for a in answers] == ["1 2 3", "4 5 6 7"]
    for a in answers:
        assert isinstance(a["greedy"], str) and isinstance(a["sampled"], str)
        assert set(a["greedy"]) <= set("0123456789 ")


def test_chatbot_csv_and_tokenizer(tmp_path: Path) -> None:
    data = tmp_path / "qa.csv"
    data.write_text(
        'Q,A,label\n12시 땡!,하루가 또 가네요.,0\n"쉼표, 있는 질문",그렇군요.,0\n,빈 질문,1\n'
        "오늘 너무 힘들어,힘내세요.,1\n",
        encoding="utf-8",
    )
    pairs, _, skipped = chatbot_task.load_pairs(chatbot.parse_args(["--data", str(data)]))
    assert skipped == 1 and pairs[1] == ("쉼표, 있는 질문", "그렇군요.")
    tok = train_subword_tokenizer([t for qa in pairs for t in qa], vocab_size=60)
    assert [tok.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert tok.decode(tok.encode("오늘 너무 힘들어").ids) == "오늘 너무 힘들어"


def test_classifier_generated_task(tmp_path: Path) -> None:
    argv = [
        "--generated-examples", "64", "--batch-size", "8", "--max-len", "16",
        "--embed", "8", "--hidden", "8", "--units", "8",
        "--classify", "abcxdef", "zzz",
    ]  # fmt: skip
    first, second = check_run_and_resume(classifier, argv, tmp_path / "run")
    assert 0.0 <= first["val_accuracy"] <= 1.0
    assert first["majority_baseline_val"] > 0
    results = second["classified"]
    assert [r["text"] for r in results] == ["abcxdef", "zzz"]
    for r in results:
        assert r["predicted"] in ("x", "y", "z")
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-2)


def test_classifier_csv_cleans_labels(tmp_path: Path) -> None:
    data = tmp_path / "labels.csv"
    data.write_text(
        "Q,A,label\n좋아해,저도요,2   \n헤어졌어,힘내요,1\n밥 먹자,좋아요,0\n"
        "이상한 줄,?,x\n빈 라벨,?,\n",
        encoding="utf-8",
    )
    examples, _, skipped = classifier_task.load_examples(
        classifier.parse_args(["--data", str(data)])
    )
    assert examples == [("좋아해", 2), ("헤어졌어", 1), ("밥 먹자", 0)]
    assert skipped == 2


def test_char_lm_on_a_mesh_matches_one_device(tmp_path):
    """--mesh data=4,model=2 on 8 host devices trains to the same loss as one device."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, sys; from examples import char_lm; "
        "a = ['--steps', '2', '--batch-size', '8', '--seq-len', '32', '--d-model', '64', "
        "'--layers', '2', '--heads', '4', '--eval-every', '0', '--no-progress', "
        "'--gen-length', '4', '--temperature', '0']; "
        f"x = char_lm.main(a + ['--out-dir', {str(tmp_path / 'a')!r}]); "
        f"y = char_lm.main(a + ['--out-dir', {str(tmp_path / 'b')!r}, "
        "'--mesh', 'data=4,model=2']); "
        "print('RESULT', json.dumps([x['val_loss'], y['val_loss']]))"
    )
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # tiny models: compiling is the cost
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    single, sharded = json.loads(line.split(" ", 1)[1])
    assert abs(single - sharded) < 1e-4 * max(1.0, abs(single))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("font", ["installed", "absent"])
def test_heatmap_draws_hangul_tokens_and_fits_its_title(tmp_path, monkeypatch, font) -> None:
    import matplotlib.pyplot as plt

    if font == "installed" and not plots.fallback_fonts():
        pytest.skip("no font with Hangul installed (pip install koreanize-matplotlib)")
    if font == "absent":
        monkeypatch.setattr(plots, "fallback_fonts", lambda: ())
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its labels
    questions, answers = ["안녕", "하세요", "?"], ["<s>", "나는", "학생", "입니다", "⏎"]
    title = "cross-attention of the last decoder layer (mean over heads)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = plots.plot_attention(
            np.random.default_rng(0).random((5, 3)),
            tmp_path / "attention.png",
            row_labels=answers,
            col_labels=questions,
            title=title,
            xlabel="question token",
            ylabel="answer token (decoder input)",
        )
    (fig,) = figures
    ax = fig.axes[0]
    xs = [label.get_text() for label in ax.get_xticklabels()]
    ys = [label.get_text() for label in ax.get_yticklabels()]
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    shown = " ".join(fig._suptitle.get_text().split())
    if font == "installed":
        assert (xs, ys) == (questions, answers)
        assert not missing, missing
        assert shown == title
    else:  # what cannot be drawn is numbered, and the title says so
        assert xs == ["#0", "#1", "?"] and ys == ["<s>", "#1", "#2", "#3", "⏎"]
        assert shown.startswith(title) and "cannot draw" in shown
    # the image holds the title (wrapped to its width), the labels and the colorbar
    width, height = _png_size(path)
    assert width >= 400 and height >= 330, (width, height)
    renderer = fig.canvas.get_renderer()
    box = fig._suptitle.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox)
    # three short tokens in wide cells: larger labels, the keys horizontal, none overlapping
    assert [t.get_rotation() for t in ax.get_xticklabels()] == [0.0] * 3
    assert min(t.get_fontsize() for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]) > 7
    _assert_tick_labels_apart_and_inside(fig, ax)
    for f in figures:
        close(f)


def _assert_tick_labels_apart_and_inside(fig: Any, ax: Any) -> None:
    """No two neighbouring tick labels overlap and each lies inside the figure."""
    renderer = fig.canvas.get_renderer()
    for labels, lo, hi in ((ax.get_xticklabels(), "x0", "x1"), (ax.get_yticklabels(), "y0", "y1")):
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
        if lo == "y0":
            boxes.sort(key=lambda b: b.y0)
        for a, b in zip(boxes, boxes[1:], strict=False):
            assert getattr(a, hi) <= getattr(b, lo), (a, b)
        for b in boxes:
            assert b.x0 >= 0 and b.y0 >= 0, b
            assert b.x1 <= fig.bbox.width and b.y1 <= fig.bbox.height, (b, fig.bbox)


@pytest.mark.parametrize(
    "labels, turned",
    [
        (list("The engineer, and the was not have he was the is"), False),  # horizontal
        (["␣좋아하는", "␣사람이", "␣생겼어", "␣그런데", "␣말을", "␣못하겠어"] * 4, True),
    ],
    ids=["characters", "long-hangul-tokens"],
)
def test_heatmap_turns_the_key_labels_only_where_they_would_overlap(
    tmp_path, monkeypatch, labels, turned
) -> None:
    import matplotlib.pyplot as plt

    if not plots.fallback_fonts():
        pytest.skip("no font with Hangul installed (pip install koreanize-matplotlib)")
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    labels = [c.replace(" ", "␣") for c in labels]
    plots.plot_attention(
        np.random.default_rng(0).random((2, 5, len(labels))),
        tmp_path / "attention.png",
        row_labels=["a", "b", "c", "d", "e"],
        col_labels=labels,
        title="t",
        panel_titles=["head 1", "head 2"],
    )
    (fig,) = figures
    for ax in fig.axes[:2]:  # the two panels (their colorbars come after them)
        assert ax.get_xticklabels()[0].get_text() == labels[0]
        rotations = {t.get_rotation() for t in ax.get_xticklabels()}
        assert rotations == ({90.0} if turned else {0.0}), rotations
        _assert_tick_labels_apart_and_inside(fig, ax)
    close(fig)


def test_the_font_package_is_in_the_examples_and_dev_extras() -> None:
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for module, _ in plots._FONT_PACKAGES:
        name = module.replace("_", "-")
        for extra in ("examples", "dev"):
            block = pyproject.split(f"\n{extra} = [", 1)[1].split("]", 1)[0]
            assert f'"{name}>=' in block, (name, extra)
