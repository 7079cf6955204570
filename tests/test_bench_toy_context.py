"The ideal reader of bench/toy_context_info.py: the bound on what a judge's context can tell."
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("toy_context_info", Path(__file__).resolve().parents[1] / "bench" / "toy_context_info.py")
ci = importlib.util.module_from_spec(spec); spec.loader.exec_module(ci)

from vlm_rlaif.toyworld import parse_claims

CTX = set(parse_claims("There are two objects in the video: a red square and a blue circle. The red square moves to the left."))


def test_the_answer_the_context_supports_wins():
    good, bad = "The red square moves to the left.", "The red square moves to the right."
    assert ci.ideal_reader(good, bad, CTX) == 1 and ci.ideal_reader(bad, good, CTX) == 2


def test_a_contradicted_claim_costs_and_an_unchecked_one_does_not():
    # the square exists (+1); its colour and its motion are contradicted (-1 each)
    assert ci.context_support(parse_claims("The blue square moves up."), CTX) == -1
    assert ci.context_support(parse_claims("The red square moves up."), CTX) == 1    # +1 object, +1 colour, -1 motion
    assert ci.context_support(parse_claims("The green triangle is still."), CTX) == 0  # nothing the context says
    assert ci.context_support(parse_claims("There are two objects."), CTX) == 1


def test_no_context_or_same_claims_cannot_decide():
    a, b = "The red square moves to the left.", "The blue square moves to the left."
    assert ci.ideal_reader(a, b, set()) == 0
    assert ci.ideal_reader(a, a, CTX) == 0
