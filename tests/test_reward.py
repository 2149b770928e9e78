"""extract_boxed and math_reward: equality is math-verify's, robustness is ours."""
import time

import pytest

from cegppo import extract_boxed, math_reward, reference_answer


def test_extract_boxed():
    assert extract_boxed(r"so \boxed{42}.") == "42"
    assert extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"                 # nested braces
    assert extract_boxed(r"\boxed{ {a}^{ {b} } }") == "{a}^{ {b} }"
    assert extract_boxed(r"first \boxed{1} then \boxed{2}") == "2"                  # the last one counts
    assert extract_boxed(r"\boxed{1} and an unclosed \boxed{2") == "1"               # last *complete* box
    assert extract_boxed("no box here") is None
    assert extract_boxed(r"\boxed{") is None
    assert extract_boxed(None) is None


@pytest.mark.parametrize("completion,answer,expected", [
    (r"The answer is \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{1000}", "1,000", 1.0),
    (r"\boxed{x^2+1}", "1+x^2", 1.0),
    (r"\boxed{5} no wait \boxed{6}", "6", 1.0),
    (r"\boxed{5} no wait \boxed{6}", "5", 0.0),
    ("The answer is 72", "72", 0.0),                                  # no box, no reward
    (r"\boxed{72}", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),   # GSM8K reference
    (r"\boxed{24}", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 0.0),
    (r"\boxed{71}", "72", 0.0),
])
def test_math_reward(completion, answer, expected):
    assert math_reward(completion, answer) == expected


@pytest.mark.parametrize("junk", ["", "\x00\xff\xfe" * 100, r"\boxed{{{{", "}" * 50, r"\boxed{}",
                                  bytes(range(256)).decode("latin-1"), None, 12345])
def test_garbage_never_raises(junk):
    assert math_reward(junk, "3") == 0.0
    assert math_reward(r"\boxed{3}", junk) in (0.0, 1.0)


def test_very_long_inputs():
    long = "blah " * 200_000 + r"\boxed{7}"
    assert math_reward(long, "7") == 1.0
    assert math_reward(r"\boxed{" + "1+" * 5000 + "1}", "5001") == 0.0      # over the answer-length cap


def test_pathological_answer_is_bounded_in_time():
    # sympy would try to evaluate 9^(9^(9^(9^9))) for ever; math-verify's timeout stops it.
    t = time.time()
    assert math_reward(r"\boxed{9^{9^{9^{9^{9}}}}}", "3") == 0.0
    assert time.time() - t < 30


def test_reference_answer():
    assert reference_answer("work... #### 1,234 ") == "1,234"
    assert reference_answer(" 17 ") == "17"
