"""The report's number formats and its cards, on hand-made stage results."""
import json

from alignflow.flows import report
from alignflow.trainers import numbers


def test_numbers_print_as_a_person_reads_them():
    assert numbers.number(59904.0) == "59,904"
    assert numbers.number(59904) == "59,904"
    assert numbers.number(0.00030000000000000003) == "3.00e-04"
    assert numbers.number(0.65741234) == "0.6574"
    assert numbers.number(None) == ""
    assert numbers.rate(14912.3, "tok/s") == "14.9k tok/s"
    assert numbers.rate(2_130_000, "tok/s") == "2.1M tok/s"
    assert numbers.rate(312.4, "tok/s") == "312 tok/s"
    assert numbers.percent(40 / 46, 46) == "87.0% (40/46)"
    assert numbers.percent(0.125) == "12.5%"
    assert numbers.duration(8.26) == "8.3 s"
    assert numbers.duration(250) == "4m10s"
    assert numbers.duration(7500) == "2h05m"


def stage(tmp_path, name, metrics, records=(), **extra):
    out = tmp_path / name
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"stage": name, "path": str(out), "content_hash": name, "metrics": metrics,
            "timings": {"train_seconds": 250.0, "tokens_per_second": 14912.3}, **extra}


def test_lm_and_dpo_losses_get_their_own_rows_with_counts(tmp_path):
    results = {
        "sft": stage(tmp_path, "sft", {"val_loss": 1.101, "tokens": 59904.0, "step": 188}),
        "dpo": stage(tmp_path, "dpo", {"val_loss": 0.688, "val_rewards/accuracies": 40 / 46, "val_items": 46,
                                       "step": 30}, [{"step": 1, "loss": 0.69}, {"step": 2, "val_loss": 0.68}]),
    }
    card = report.report_card(str(tmp_path), "r", results, ["sft", "dpo"], inline=False)
    rows = {line.split(" | ")[0].strip("| "): line for line in card.splitlines() if line.startswith("| ")}
    assert rows["LM val loss"] == "| LM val loss | 1.101 |  |"
    assert rows["DPO val loss"] == "| DPO val loss |  | 0.688 |"
    assert rows["DPO val accuracy"] == "| DPO val accuracy |  | 87.0% (40/46) |"
    assert rows["tokens trained on"] == "| tokens trained on | 59,904 |  |"
    assert rows["throughput"] == "| throughput | 14.9k tok/s | 14.9k tok/s |"
    assert rows["checkpoint"] == f"| checkpoint | `{tmp_path / 'sft'}` | `{tmp_path / 'dpo'}` |"
    # report.md links each curves.png (only DPO logged curves here); the artifact embeds it.
    report.plot_curves(tmp_path / "dpo", "dpo")
    card = report.report_card(str(tmp_path), "r", results, ["sft", "dpo"], inline=False)
    assert "![dpo curves](dpo/curves.png)" in card and "### sft\n\nNo curves were logged." in card
    inline = report.report_card(str(tmp_path), "r", results, ["sft", "dpo"], inline=True)
    assert inline.count("](data:image/png;base64,") == 1


def test_a_stage_from_another_chain_stays_in_the_report_and_says_if_its_parent_changed(tmp_path):
    sft = stage(tmp_path, "sft", {"step": 1})
    on_disk = {str(tmp_path / "dpo"): stage(tmp_path, "dpo", {"step": 2}, parent_hash="sft"),
               str(tmp_path / "grpo"): stage(tmp_path, "grpo", {"step": 3}, parent_hash="an older sft")}
    every = report.complete_stages(str(tmp_path), {"sft": sft}, on_disk.get)
    assert list(every) == ["sft", "dpo", "grpo"]
    assert [report.status(r) for r in every.values()] == \
        ["trained", "from an earlier run", "from an earlier run, on an older parent"]


def test_evaluation_rows_show_each_stage_and_its_change_from_the_parent(tmp_path):
    def evaluation(sets, lm_eval=None):
        return {"sets": sets, "lm_eval": lm_eval or {}, "seconds": 12.0}

    results = {
        "pretrain": stage(tmp_path, "pretrain", {"step": 1}, evaluation=evaluation(
            {"demo": {"accuracy": 1 / 46, "prompts": 46, "sampled_reward": 0.125}})),
        "sft": stage(tmp_path, "sft", {"step": 1}, evaluation=evaluation(
            {"demo": {"accuracy": 19 / 46, "prompts": 46, "sampled_reward": 0.5}}, {"arith": {"exact_match": 0.5}})),
        "dpo": stage(tmp_path, "dpo", {"step": 1}, evaluation=evaluation(
            {"demo": {"accuracy": 19 / 46, "prompts": 46, "sampled_reward": 0.375},
             "mine": {"greedy_reward": 0.3, "prompts": 10}},
            {"arith": {"exact_match": 0.75, "exact_match_stderr": 0.1}})),
    }
    card = report.report_card(str(tmp_path), "r", results, list(results), inline=False)
    rows = {line.split(" | ")[0].strip("| "): line for line in card.splitlines() if line.startswith("| ")}
    # pretrain has no parent in the report: no change; sft is measured from pretrain, dpo from sft.
    assert rows["demo: accuracy"] == "| demo: accuracy | 2.2% (1/46) | 41.3% (19/46) ▲ 39.1 pts | 41.3% (19/46) ±0 |"
    assert rows["demo: reward (sampled)"] == "| demo: reward (sampled) | 0.125 | 0.5 ▲ 0.375 | 0.375 ▼ 0.125 |"
    assert rows["mine: reward (greedy)"] == "| mine: reward (greedy) |  |  | 0.3 |"
    assert rows["lm-eval arith: exact_match"] == "| lm-eval arith: exact_match |  | 0.5 | 0.75 ▲ 0.25 |"
    assert "lm-eval arith: exact_match_stderr" not in rows
    assert rows["eval time"] == "| eval time | 12.0 s | 12.0 s | 12.0 s |"
    # The chart: one panel per set's headline and per lm-eval task, in the run directory.
    assert report.eval_report.headlines(results) == [
        ("demo", "accuracy", {"pretrain": 1 / 46, "sft": 19 / 46, "dpo": 19 / 46}),
        ("mine", "greedy_reward", {"dpo": 0.3}), ("lm-eval arith", "exact_match", {"sft": 0.5, "dpo": 0.75})]
    assert report.eval_report.plot(results, tmp_path / report.EVAL_CHART).stat().st_size > 1000
    assert "![evaluation](eval.png)" in report.report_card(str(tmp_path), "r", results, list(results), inline=False)
