"""``pipo bench --workload speculate`` end to end on a tiny text model: one row per variant, each
with tokens equal to plain's, and the JSON written."""

from __future__ import annotations

import json

from pipo.cli import main


def test_speculate_workload_rows(tmp_path, capsys):
    from tests.cli.tiny_text_model import build_text_model

    model = build_text_model(tmp_path / "model")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"kind": "chat", "prompt": p})
                                 for p in ("abcabc", "hello hello")) + "\n")
    out = tmp_path / "spec.json"
    assert main(["bench", "--workload", "speculate", "--model", str(model), "--placement", "host",
                 "--prompts", str(prompts), "--gen-len", "6", "--drafts", "ngram,int4",
                 "--draft-group-size", "32", "--draft-budget", "6", "--no-chat", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["plain", "ngram", "ngram tree N=6", "int4",
                                            "int4 (no overlap)", "int4 tree N=6"]
    assert all(r["equal_to_plain"] for r in rows)
    assert "tokens / target pass" in capsys.readouterr().out


def test_link_bytes_leave_out_an_embedding_read_by_rows(tmp_path):
    import pipo
    from pipo.bench.speculate import link_nbytes_per_pass
    from pipo.io.source import open_model
    from pipo.io.store import convert
    from tests.io.test_gguf import write_tiny_gguf

    store = convert(open_model(write_tiny_gguf(tmp_path / "tiny.gguf")), tmp_path / "store",
                    weights="fp32")
    with pipo.load(store, placement="disk") as engine:
        gen = engine.generate_ids([[3, 4, 5]], 2)
        streamed = sum(engine.source.block_nbytes(b) for b in gen.plan.streamed())
        assert link_nbytes_per_pass(engine, gen.plan) == streamed - engine.source.block_nbytes("embed")
