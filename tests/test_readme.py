from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.strip() == "```bash":
            inside, current = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(current).strip())
        elif inside:
            current.append(line)
    return blocks


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 2 and all("\n" not in b for b in blocks), blocks
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert blocks[1] in ci_lines, "`.ci/run` must run README's test command verbatim"
    assert "pytest" in blocks[1]


def test_readme_example_files_exist():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    for word in blocks[0].split():
        if word.endswith(".py"):
            assert (ROOT / word).is_file(), word


def test_readme_api_example_runs(tmp_path, monkeypatch):
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler

    from tiny_models import tiny_unet

    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 10
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "my-ddpm")
    monkeypatch.chdir(tmp_path)
    batches = [(torch.rand(4, 1, 8, 8) * 2 - 1, torch.rand(4, 1, 8, 8) * 2 - 1) for _ in range(2)]
    exec(compile(code, "README.md", "exec"), {"batches": batches})
    assert (tmp_path / "unlearned-adapter" / "pytorch_lora_weights.safetensors").is_file()
