"""The verdict block: each claim's figure, threshold and pass/fail, the flags, and the model card section."""

import argparse

import pytest

from diffusers_unlearn.verdict import (
    FAIL,
    NOT_SHOWN,
    PASS,
    VerdictThresholds,
    add_verdict_arguments,
    build_verdict,
    check_verdict_arguments,
    verdict_table,
)


def claims(verdict):
    return {c["claim"]: c for c in verdict["claims"]}


def test_data_unlearning_claims_at_their_thresholds():
    before = {"memorization_rate": 0.4, "mia_auc": 0.99, "fd": 4.0, "fd_to_retrain": 3.0}
    after = {"memorization_rate": 0.0, "mia_auc": 0.65, "fd": 4.6, "fd_to_retrain": 3.0}
    verdict = build_verdict(before, after, VerdictThresholds(), retrained_model="retrained")
    by_name = claims(verdict)
    assert [c["claim"] for c in verdict["claims"]] == ["copies_gone", "forget_like_unseen", "others_unchanged", "close_to_retrain"]
    # Every figure sits exactly on its threshold: all pass.
    assert {name: c["result"] for name, c in by_name.items()} == dict.fromkeys(by_name, PASS)
    assert by_name["others_unchanged"]["figure"] == "fd" and by_name["others_unchanged"]["base"] == 4.0
    assert verdict["result"] == PASS and verdict["not_shown"] == []

    # One step past each threshold fails that claim, and the overall result.
    worse = {"memorization_rate": 1 / 2048, "mia_auc": 0.66, "fd": 4.61, "fd_to_retrain": 3.01}
    failed = build_verdict(before, worse, VerdictThresholds(), retrained_model="retrained")
    assert {c["result"] for c in failed["claims"]} == {FAIL}
    assert failed["result"] == FAIL
    # An overshoot (the forget item conspicuously unlikely, AUC near 0) fails "looks like unseen data" too.
    overshoot = build_verdict(before, {**after, "mia_auc": 0.02}, VerdictThresholds(), retrained_model="retrained")
    assert claims(overshoot)["forget_like_unseen"]["result"] == FAIL


def test_unmeasured_claims_are_not_shown_with_the_flag_that_measures_them():
    verdict = build_verdict({"memorization_rate": 0.5}, {"memorization_rate": 0.0}, VerdictThresholds())
    by_name = claims(verdict)
    assert by_name["copies_gone"]["result"] == PASS
    assert by_name["forget_like_unseen"]["result"] == NOT_SHOWN and "--heldout_data_dir" in by_name["forget_like_unseen"]["reason"]
    assert by_name["others_unchanged"]["result"] == NOT_SHOWN
    assert by_name["close_to_retrain"]["result"] == NOT_SHOWN and "--retrained_model_name_or_path" in by_name["close_to_retrain"]["reason"]
    assert verdict["result"] == PASS and verdict["not_shown"] == ["forget_like_unseen", "others_unchanged", "close_to_retrain"]
    table = verdict_table(verdict)
    assert "not shown: no held-out data" in table and "Overall: pass** (on the claims shown; not shown: forget_like_unseen" in table
    assert build_verdict({}, {}, VerdictThresholds())["result"] == NOT_SHOWN


def test_quality_figure_order_and_class_unlearning():
    thresholds = VerdictThresholds(max_accuracy_drop=0.1)
    # The text-to-image toy's digit accuracy is preferred over the keep loss.
    verdict = build_verdict({"other_prompts_digit_accuracy": 0.99, "keep_loss": 0.1}, {"other_prompts_digit_accuracy": 0.88, "keep_loss": 0.1}, thresholds)
    assert claims(verdict)["others_unchanged"]["figure"] == "other_prompts_digit_accuracy"
    assert claims(verdict)["others_unchanged"]["result"] == FAIL
    # Without a classifier the keep loss decides.
    verdict = build_verdict({"keep_loss": 0.10}, {"keep_loss": 0.109}, thresholds)
    assert (claims(verdict)["others_unchanged"]["figure"], claims(verdict)["others_unchanged"]["result"]) == ("keep_loss", PASS)
    # Class unlearning claims PUL, not copies.
    verdict = build_verdict({"fd": 3.0}, {"pul": 89.5, "fd": 3.1}, VerdictThresholds(), class_unlearning=True)
    assert claims(verdict)["class_forgotten"]["result"] == FAIL and "copies_gone" not in claims(verdict)
    verdict = build_verdict({"fd": 3.0}, {"pul": 100.0, "fd": 3.1}, VerdictThresholds(), class_unlearning=True)
    assert claims(verdict)["class_forgotten"]["result"] == PASS


def test_retrain_claim_without_features_uses_the_auc_against_the_retrained_model():
    verdict = build_verdict({}, {"mia_auc_vs_retrain": 0.7}, VerdictThresholds(), retrained_model="r")
    claim = claims(verdict)["close_to_retrain"]
    assert (claim["figure"], claim["result"]) == ("mia_auc_vs_retrain", FAIL)


@pytest.mark.parametrize("flag, value", [("--verdict_mia_auc_tolerance", "0.6"), ("--verdict_max_copy_rate", "-0.1"), ("--verdict_min_pul", "101")])
def test_out_of_range_thresholds_are_refused_naming_the_flag(flag, value, capsys):
    parser = argparse.ArgumentParser()
    add_verdict_arguments(parser)
    args = parser.parse_args([flag, value])
    with pytest.raises(SystemExit):
        check_verdict_arguments(parser, args)
    assert flag in capsys.readouterr().err


def test_flags_set_the_thresholds():
    parser = argparse.ArgumentParser()
    add_verdict_arguments(parser)
    args = parser.parse_args(["--verdict_max_copy_rate", "0.01", "--verdict_max_retrain_fd_ratio", "0.8"])
    check_verdict_arguments(parser, args)
    assert args.verdict_thresholds == VerdictThresholds(max_copy_rate=0.01, max_retrain_fd_ratio=0.8)
    # Every documented flag reaches its threshold.
    values = {"max_copy_rate": 0.02, "min_pul": 80.0, "mia_auc_tolerance": 0.1, "max_accuracy_drop": 0.03,
              "max_fd_increase": 0.2, "max_keep_loss_increase": 0.05, "max_retrain_fd_ratio": 0.9}
    args = parser.parse_args([item for name, value in values.items() for item in (f"--verdict_{name}", str(value))])
    check_verdict_arguments(parser, args)
    assert args.verdict_thresholds == VerdictThresholds(**values)


def test_model_card_has_the_verdict_section(tmp_path):
    from diffusers_unlearn.hub import write_model_card

    before = {"memorization_rate": 0.5, "mia_auc": 0.9}
    after = {"memorization_rate": 0.0, "mia_auc": 0.5}
    report = {"method": "siss", "metrics": {"before": before, "after": after},
              "verdict": build_verdict(before, after, VerdictThresholds())}
    card = open(write_model_card(str(tmp_path), report, base_model="base")).read()
    assert "## Verdict" in card
    assert "| No generation is a copy of a forget item | `memorization_rate` | 0.5 | 0 | <= 0 | pass |" in card
    assert "not shown: no retrained model: give --retrained_model_name_or_path" in card
