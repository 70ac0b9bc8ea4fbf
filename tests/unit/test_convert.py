"""`rayd convert` on tiny checkpoints (the GGUF path is in tests/e2e/test_smollm2.py) and prompt
encoding with chat templates."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayd.commands.convert import convert, main, parse_keep_layers, spaced_layers, subset_state_dict
from rayd.config import ConfigError
from rayd.data.prompts import encode_prompt
from rayd.models import build_char_tokenizer, build_tiny_llama


def test_spaced_layers_keep_first_and_last():
    assert spaced_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert spaced_layers(4, 4) == [0, 1, 2, 3]
    assert spaced_layers(5, 2) == [0, 4]
    assert spaced_layers(5, 1) == [0]
    with pytest.raises(ConfigError, match="the model has 5 layers"):
        spaced_layers(5, 6)


def test_keep_layers_are_checked():
    assert parse_keep_layers("0, 2,4", 5) == [0, 2, 4]
    for bad, needle in (("0,x", "comma-separated"), ("0,5", r"\[0, 4\]"), ("2,1", "increasing")):
        with pytest.raises(ConfigError, match=needle):
            parse_keep_layers(bad, 5)


def test_subset_renumbers_layers_and_keeps_the_rest():
    state = {
        "model.embed_tokens.weight": 0,
        "model.layers.0.mlp.w": 1,
        "model.layers.1.mlp.w": 2,
        "model.layers.2.mlp.w": 3,
        "model.layers.10.mlp.w": 4,
        "model.norm.weight": 5,
    }
    assert subset_state_dict(state, [0, 2, 10]) == {
        "model.embed_tokens.weight": 0,
        "model.layers.0.mlp.w": 1,
        "model.layers.1.mlp.w": 3,
        "model.layers.2.mlp.w": 4,
        "model.norm.weight": 5,
    }


def test_layer_cut_student_keeps_the_teachers_weights(tmp_path):
    teacher_dir = build_tiny_llama(
        tmp_path / "teacher", layers=4, hidden=64, heads=2, seed=3, tie_embeddings=True
    )
    record = convert(str(teacher_dir), tmp_path / "student", keep_layers="0,3")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 2
    assert record["layers_kept"] == [0, 3] and record["layers_total"] == 4
    assert record["params"] == sum(p.numel() for p in student.parameters())
    t, s = teacher.state_dict(), student.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        torch.testing.assert_close(s[name], t[name], rtol=0, atol=0)
    torch.testing.assert_close(
        s["model.layers.1.self_attn.q_proj.weight"], t["model.layers.3.self_attn.q_proj.weight"]
    )
    # Still tied: the head is the embedding, not a copy that training would let drift apart.
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    saved = json.loads((tmp_path / "student" / "rayd_convert.json").read_text())
    assert saved["source"] == str(teacher_dir)
    assert AutoTokenizer.from_pretrained(tmp_path / "student").get_vocab() == (
        AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    )


def test_convert_refuses_bad_sources_with_one_line(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    cases = [
        ([str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o1")], "does not exist"),
        ([str(tmp_path), "--out", str(tmp_path / "o2")], "neither a .gguf file"),
        ([str(tmp_path), "--out", str(tmp_path / "taken")], "exists and is not empty"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_prompts_use_the_chat_template_when_the_tokenizer_has_one():
    tok = build_char_tokenizer()
    plain = encode_prompt(tok, "1+2=")
    assert tok.decode(plain) == "1+2="
    tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    templated = encode_prompt(tok, "1+2=")
    assert tok.decode(templated) == "<1+2=>"
    assert encode_prompt(tok, "1+2=", chat_template=False) == plain
