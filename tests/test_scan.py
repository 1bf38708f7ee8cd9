"""python -m diffusers_unlearn.scan on a tiny random pipeline."""

import json

import pytest

from diffusers_unlearn import scan
from diffusers_unlearn.data import DataError, read_prompts_file

from tiny_models import save_tiny_sd_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "model")


def test_scan_ranks_and_writes_what_the_sd_script_reads(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"caption": c, "index": i}) for i, c in enumerate(["a digit seven", "a photo of a cat", "a digit one"])))
    out = tmp_path / "ranked.jsonl"
    common = ["--pretrained_model_name_or_path", model_dir, "--prompts_file", str(prompts), "--num_generations", "2", "--num_inference_steps", "2"]
    rows = scan.main(common + ["--output_file", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == rows and [r["rank"] for r in rows] == [1, 2, 3]
    scores = [r["noise_norm"] for r in rows]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert sorted(read_prompts_file(out)) == sorted(["a digit seven", "a photo of a cat", "a digit one"])
    top = scan.main(common + ["--output_file", str(tmp_path / "top.jsonl"), "--top_k", "1"])
    assert top == rows[:1]


def test_scan_rejects_bad_prompt_files_before_loading(tmp_path):
    missing = ["--pretrained_model_name_or_path", "/nonexistent/model", "--output_file", str(tmp_path / "o.jsonl")]
    with pytest.raises(DataError, match="does not exist"):
        scan.main(missing + ["--prompts_file", str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no prompts"):
        scan.main(missing + ["--prompts_file", str(tmp_path / "empty.jsonl")])
    (tmp_path / "bad.jsonl").write_text('{"url": "x"}\n')
    with pytest.raises(DataError, match="no 'caption' field"):
        scan.main(missing + ["--prompts_file", str(tmp_path / "bad.jsonl")])
    (tmp_path / "ok.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match="--top_k"):
        scan.main(missing + ["--prompts_file", str(tmp_path / "ok.txt"), "--top_k", "0"])
    assert not (tmp_path / "o.jsonl").exists()


def test_scan_plain_text_batch_size_and_table(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit seven\n\na photo of a cat\na digit seven\n")  # blank line and duplicate dropped
    common = ["--pretrained_model_name_or_path", model_dir, "--prompts_file", str(prompts), "--num_generations", "2", "--num_inference_steps", "2", "--seed", "3"]
    one = scan.main(common + ["--output_file", str(tmp_path / "one.jsonl"), "--batch_size", "1"])
    many = scan.main(common + ["--output_file", str(tmp_path / "many.jsonl"), "--batch_size", "8"])
    assert [r["caption"] for r in one] == [r["caption"] for r in many] and len(one) == 2
    assert [r["noise_norm"] for r in one] == pytest.approx([r["noise_norm"] for r in many], rel=1e-5)
    out = capsys.readouterr().out
    assert "rank" in out and "a photo of a cat" in out and "Wrote 2 prompt(s)" in out
    with pytest.raises(ValueError, match="--batch_size"):
        scan.main(common + ["--output_file", str(tmp_path / "x.jsonl"), "--batch_size", "0"])
