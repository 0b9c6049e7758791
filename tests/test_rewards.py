"""Rewards on known strings, the safe expression parser, the generated tasks (Sudoku, Countdown), answer extraction
(GSM8K, MATH), reward sets, user functions, hub prompts through a local file, and every conf/reward|prompts yaml."""

from __future__ import annotations

import ast
import json
import pickle
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dlm.rewards
from dlm.config import CONF_DIR
from dlm.data.brackets import BracketsTask
from dlm.errors import UserError
from dlm.rewards import (
    ArithmeticCorrectness,
    ArithmeticPrompts,
    BracketPrompts,
    BracketValidity,
    CountdownPrompts,
    CountdownReward,
    FunctionReward,
    GSM8KReward,
    HubPrompts,
    IntegerAnswer,
    MathReward,
    RewardError,
    RewardSet,
    SudokuPrompts,
    SudokuReward,
    XMLFormat,
    XMLTagCount,
    as_reward_set,
)
from dlm.rewards.answers import gsm8k_prediction, gsm8k_reference, last_boxed, number_value
from dlm.rewards.countdown import solve_countdown
from dlm.rewards.expression import ExpressionError, evaluate
from dlm.rewards.math_answer import math_equal, math_prediction, math_reference
from dlm.rewards.sudoku import count_solutions, generate_puzzle, is_solution


# -- brackets --------------------------------------------------------------------------------------------------------
def test_bracket_validity_on_known_strings():
    reward = BracketValidity()
    texts = ["([]())[]", "(]", "(((", "", "ab", " [()] "]
    assert reward(texts, [""] * len(texts)) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert reward(["])"], ["(["]) == [1.0]  # the prompt is part of the string that is checked
    assert reward(["]"], ["(["]) == [0.0]


def test_bracket_novelty_bonus_pays_only_unseen_valid_strings():
    task = {"num_train": 200, "num_val": 16, "max_pairs": 4}
    seen = BracketsTask(**task).documents("train")[0]
    reward = BracketValidity(novel_bonus=0.5, task=task)
    unseen = "(" * 9 + ")" * 9  # deeper than max_depth: never generated
    assert reward([seen, unseen, "(("], ["", "", ""]) == [1.0, 1.5, 0.0]


def test_bracket_prompts_unconditional_and_conditional():
    rows = list(BracketPrompts(num_train=5, num_val=3).rows("train"))
    assert len(rows) == 5 and all(r["prompt"] == "" for r in rows)
    assert len(list(BracketPrompts(num_train=5, num_val=3).rows("validation"))) == 3
    source = BracketPrompts(conditional=True, num_train=50, num_val=20, task={"num_train": 200, "num_val": 20})
    val = [r["prompt"] for r in source.rows("val")]
    assert val == [r["prompt"] for r in source.rows("val")]  # deterministic
    assert all(set(p) <= set("()[]") for p in val) and any(val)
    with pytest.raises(UserError, match="unknown prompt split"):
        list(source.rows("dev"))


# -- arithmetic ------------------------------------------------------------------------------------------------------
def test_arithmetic_correctness_on_known_strings():
    reward = ArithmeticCorrectness(wellformed_score=0.25)
    prompts = ["47+8="] * 5
    assert reward(["55", "56", "5x", "", "055"], prompts) == [1.0, 0.25, 0.0, 0.0, 0.0]
    fixed = ArithmeticCorrectness(fixed_width=True)
    assert fixed(["055", "55"], ["47+08="] * 2) == [1.0, 0.0]


def test_arithmetic_prompts_carry_the_answer_and_splits_are_disjoint():
    source = ArithmeticPrompts(num_train=300, num_val=40, seed=3)
    train, val = list(source.rows("train")), list(source.rows("val"))
    assert len(train) == 300 and len(val) == 40
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in val})
    reward = ArithmeticCorrectness()
    assert reward([r["answer"] for r in val], [r["prompt"] for r in val]) == [1.0] * 40
    assert [r["prompt"] for r in ArithmeticPrompts(num_train=300, num_val=40, seed=3).rows("val")] == [
        r["prompt"] for r in val
    ]


# -- the expression parser -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [("1+2*3", 7), ("(1+2)*3", 9), ("8-3-2", 3), ("8/4/2", 1), ("2*(3+4)*5", 70), ("7/2", Fraction(7, 2)),
     ("6/4*2", 3), (" ( ( 5 ) ) ", 5), ("100-99*1", 1)],
)
def test_expression_precedence_parentheses_and_exact_division(text, value):
    assert evaluate(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "1+", "(1+2", "1+2)", "2**3", "-1+2", "1/0", "3/(2-2)", "__import__('os')", "1.5+2", "abc", "1 2",
     "2^3", "07+1", "1" * 300, "(" * 40 + "1" + ")" * 40, "٣+1"],
)
def test_expression_junk_is_refused(text):
    with pytest.raises(ExpressionError):
        evaluate(text)


def test_expression_number_use():
    assert evaluate("25*4-3", [3, 4, 25]) == 97
    assert evaluate("25*4", [3, 4, 25]) == 100  # at most once: leaving 3 unused is allowed
    with pytest.raises(ExpressionError, match="unused"):
        evaluate("25*4", [3, 4, 25], use_all=True)
    with pytest.raises(ExpressionError, match="beyond"):
        evaluate("25*4*4", [3, 4, 25])  # 4 reused
    with pytest.raises(ExpressionError, match="beyond"):
        evaluate("25*5", [3, 4, 25])  # a number not given
    assert evaluate("3*3", [3, 3]) == 9  # a repeated given number may be used as often as it is given


# -- countdown -------------------------------------------------------------------------------------------------------
def test_countdown_reward_on_known_strings():
    reward = CountdownReward()
    cols = {"numbers": [[3, 4, 25]] * 7, "target": [97] * 7}
    completions = [
        "<answer>25*4-3</answer>",  # right
        "I think <answer> 4 * 25 - 3 </answer>",  # right, spaces
        "<answer>25*4+3</answer>",  # wrong value
        "<answer>25*4*4-3</answer>",  # reuses 4
        "<answer>__import__('os').system('x')</answer>",  # junk: parsed, never executed
        "25*4-3",  # no answer tag
        "",
    ]
    assert reward(completions, [""] * 7, **cols) == [1.0, 1.0, 0.1, 0.1, 0.1, 0.0, 0.0]
    bare = CountdownReward(tag=None, use_all=True)
    assert bare(["25*4-3", "25*4"], ["", ""], numbers=[[3, 4, 25]] * 2, target=[97, 100]) == [1.0, 0.1]


def test_countdown_reward_names_a_missing_column():
    with pytest.raises(RewardError, match="'target'"):
        CountdownReward()(["<answer>1</answer>"], [""], numbers=[[1]])


def test_countdown_instances_are_solvable_deterministic_and_disjoint():
    source = CountdownPrompts(num_train=120, num_val=40, seed=1)
    val, train = list(source.rows("val")), list(source.rows("train"))
    assert val == list(CountdownPrompts(num_train=120, num_val=40, seed=1).rows("val"))
    assert val != list(CountdownPrompts(num_train=120, num_val=40, seed=2).rows("val"))
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    assert {key(r) for r in train}.isdisjoint({key(r) for r in val})
    reward = CountdownReward(use_all=True)
    for row in val:
        assert len(row["numbers"]) == 3 and str(row["target"]) in row["prompt"]
        solution = solve_countdown(row["numbers"], row["target"], use_all=True)
        assert solution is not None, row
        assert reward([f"<answer>{solution}</answer>"], [row["prompt"]], numbers=[row["numbers"]],
                      target=[row["target"]]) == [1.0]


def test_countdown_solver_reports_unsolvable():
    assert solve_countdown([1, 1], 1000) is None
    assert evaluate(solve_countdown([2, 3, 7], 23, use_all=True), [2, 3, 7], use_all=True) == 23


# -- sudoku ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "num_empty"), [(4, 10), (4, 12), (9, 45)])
def test_sudoku_generator_makes_unique_valid_puzzles(size, num_empty):
    rng = np.random.default_rng(0)
    for _ in range(5 if size == 4 else 2):
        puzzle, solution = generate_puzzle(rng, size, num_empty)
        p, s = [int(c) for c in puzzle], [int(c) for c in solution]
        assert len(puzzle) == size * size and 0 < puzzle.count("0") <= num_empty
        assert is_solution(s, p, size)
        assert count_solutions(p, size, limit=5) == 1


def test_sudoku_checker():
    solution = [int(c) for c in "1234341221434321"]
    puzzle = [int(c) for c in "1030001221004301"]
    assert is_solution(solution, puzzle, 4)
    swapped = solution[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert not is_solution(swapped, puzzle, 4)  # rows fine, columns and clue broken
    assert not is_solution(solution[:15], puzzle, 4)
    assert count_solutions([0] * 16, 4, limit=2) == 2
    assert count_solutions([1, 1] + [0] * 14, 4) == 0  # clashing clues


def test_sudoku_reward_on_known_strings():
    puzzle, solution = "1030001221004301", "1234341221434321"
    cols = {"puzzle": [puzzle] * 6, "solution": [solution] * 6}
    one_wrong = solution[:1] + "4" + solution[2:]  # cell 1 is empty in the puzzle
    completions = [
        f"<answer>{solution}</answer>",
        "<answer>\n1234\n3412\n2143\n4321\n</answer>",  # one row per line
        f"<answer>{one_wrong}</answer>",
        f"<answer>{puzzle}</answer>",  # the puzzle back: no empty cell filled
        solution,  # no tag
        "",
    ]
    empty = puzzle.count("0")
    assert SudokuReward()(completions, [""] * 6, **cols) == pytest.approx(
        [1.0, 1.0, (empty - 1) / empty, 0.0, 0.0, 0.0]
    )
    exact = SudokuReward(exact=True)
    assert exact(completions, [""] * 6, **cols) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert SudokuReward(tag=None)([solution], [""], puzzle=[puzzle], solution=[solution]) == [1.0]


def test_sudoku_prompts_are_deterministic_disjoint_and_scored_by_their_own_solution():
    source = SudokuPrompts(num_train=60, num_val=20, seed=0)
    val, train = list(source.rows("val")), list(source.rows("train"))
    assert val == list(SudokuPrompts(num_train=60, num_val=20, seed=0).rows("val"))
    assert {r["puzzle"] for r in train}.isdisjoint({r["puzzle"] for r in val})
    assert all(6 <= r["puzzle"].count("0") <= 10 and r["puzzle"] in r["prompt"] for r in val)
    completions = [f"<answer>{r['solution']}</answer>" for r in val]
    cols = {"puzzle": [r["puzzle"] for r in val], "solution": [r["solution"] for r in val]}
    assert SudokuReward(exact=True)(completions, [r["prompt"] for r in val], **cols) == [1.0] * 20


# -- GSM8K and MATH extraction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("completion", "number"),
    [
        ("She has 3 apples, then 5 more, so 8.", "8"),
        ("The total is 1,234 dollars.", "1,234"),
        ("The answer is -5.", "-5"),
        ("Each costs $2.50 so the answer is 7.5", "7.5"),
        ("so \\boxed{42} and 7 more words 9", "42"),
        ("<reasoning>2+2=4 and 10</reasoning>\n<answer>\n4\n</answer>", "4"),
        ("work 3 4\n#### 12", "12"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_gsm8k_prediction(completion, number):
    assert gsm8k_prediction(completion) == number


def test_gsm8k_reference_and_number_values():
    assert gsm8k_reference("Natalia sold 48/2 = 24 clips.\n#### 1,072") == "1072"
    assert number_value("1,234.50") == Fraction(2469, 2)
    assert number_value("18.00") == 18 and number_value("$-7") == -7 and number_value("-7") == -7
    assert number_value("1,2") is None  # not a thousands separator: a list
    assert number_value("\\frac{1}{2}") == Fraction(1, 2)


def test_gsm8k_reward_on_known_strings():
    answer = "The clips: 48 + 24 = 72\n#### 72"
    completions = ["The answer is 72.", "\\boxed{72.00}", "<answer>\n71\n</answer>", "seventy-two", ""]
    assert GSM8KReward()(completions, [""] * 5, answer=[answer] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert GSM8KReward()(["so 1,000,000"], [""], answer=["#### 1000000"]) == [1.0]
    assert GSM8KReward()(["it is -3"], [""], answer=["#### -3"]) == [1.0]


def test_boxed_extraction():
    assert last_boxed("first \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed 5 done") == "5"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None


@pytest.mark.parametrize(
    ("prediction", "reference", "equal"),
    [
        ("\\frac{1}{2}", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "\\frac12", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\tfrac{1}{2}", True),
        ("x = 3", "3", True),
        ("90^\\circ", "90", True),
        ("\\left( 1, 2 \\right)", "(1,2)", True),
        ("5\\text{ cm}", "5", True),
        ("\\$18", "18", True),
        ("1,000", "1000", True),
        ("\\sqrt2", "\\sqrt{2}", True),
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        ("1,2", "12", False),
        ("", "0", False),
        (None, "1", False),
    ],
)
def test_math_equal(prediction, reference, equal):
    assert math_equal(prediction, reference) is equal


def test_math_reward_on_known_strings():
    solution = "We get $x = \\frac{1}{2}$, so the answer is $\\boxed{\\frac{1}{2}}$."
    assert math_reference(solution) == "\\frac{1}{2}"
    assert math_prediction("The answer is 0.5.") == "0.5"
    completions = ["thus \\boxed{\\frac{1}{2}}", "<answer>\n\\boxed{0.5}\n</answer>", "\\boxed{\\frac{1}{3}}",
                   "<answer>1/2</answer>", "no answer", ""]
    assert MathReward()(completions, [""] * 6, answer=[solution] * 6) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert MathReward()(["\\boxed{3}"], [""], answer=["3"]) == [1.0]  # MATH-500's bare answer column


# -- format ----------------------------------------------------------------------------------------------------------
def test_xml_format_rewards():
    good = "<reasoning>\n2+2 is 4\n</reasoning>\n<answer>\n4\n</answer>\n"
    squashed = "<reasoning>2+2</reasoning> <answer>4</answer>"
    texts = [good, good.rstrip("\n"), squashed, "<answer>\n4\n</answer>", "just 4", "", "x" + good]
    assert XMLFormat(strict=True)(texts, [""] * 7) == [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert XMLFormat(strict=False)(texts, [""] * 7) == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    counts = XMLTagCount()([good, good + "tail", "", squashed], [""] * 4)
    assert counts[0] == pytest.approx(0.5) and counts[1] < counts[0] and counts[2] == 0.0 and counts[3] == 0.0
    ints = IntegerAnswer()([good, "<answer>-4</answer>", "<answer>4.5</answer>", "<answer> 12 </answer>", "4"], [""] * 5)
    assert ints == [0.5, 0.0, 0.0, 0.5, 0.0]


# -- sets and user functions -----------------------------------------------------------------------------------------
def test_reward_set_weights_and_components():
    rewards = RewardSet({"valid": BracketValidity(), "fmt": XMLFormat(strict=False, value=1.0)},
                        weights={"valid": 2.0})
    assert rewards.weights == {"valid": 2.0, "fmt": 1.0}
    parts = rewards.components(["()", "(("], ["", ""])
    assert parts == {"valid": [1.0, 0.0], "fmt": [0.0, 0.0]}
    assert rewards.total({"valid": [1.0, 0.0], "fmt": [1.0, 1.0]}) == [3.0, 1.0]
    with pytest.raises(ValueError, match="unknown reward"):
        RewardSet({"valid": BracketValidity()}, weights={"nope": 1.0})
    single = as_reward_set(BracketValidity())
    assert list(single.rewards) == ["brackets_valid"] and as_reward_set(rewards) is rewards


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def exclaims(prompts, completions, answer, **kwargs):
            return [float(c.count("!")) + (answer[i] == "x") for i, c in enumerate(completions)]
        def wrong_length(prompts, completions, **kwargs):
            return [1.0]
        def not_numbers(prompts, completions, **kwargs):
            return ["high" for _ in completions]
        def returns_none(prompts, completions, **kwargs):
            return None
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_rewards", None)


def test_function_reward_calls_trl_style(user_module):
    reward = FunctionReward(path="my_rewards:exclaims")
    assert reward.name == "exclaims"
    assert reward(["a!!", "b"], ["p", "q"], answer=["x", "y"]) == [3.0, 0.0]


@pytest.mark.parametrize(
    ("path", "message"),
    [("my_rewards", "package.module:function"), ("no_such_module_xyz:f", "cannot import"),
     ("my_rewards:missing", "no attribute"), ("my_rewards:NOT_CALLABLE", "not a function")],
)
def test_function_reward_bad_paths(user_module, path, message):
    with pytest.raises(RewardError, match=message):
        FunctionReward(path=path)


@pytest.mark.parametrize(
    ("fn", "message"),
    [("wrong_length", "1 values for 2"), ("not_numbers", "finite number"), ("returns_none", "NoneType")],
)
def test_function_reward_wrong_returns(user_module, fn, message):
    with pytest.raises(RewardError, match=message):
        FunctionReward(path=f"my_rewards:{fn}")(["a", "b"], ["", ""])


# -- hub prompts, through a local file -------------------------------------------------------------------------------
def test_hub_prompts_read_a_local_jsonl_through_load_dataset(tmp_path):
    rows = [{"question": f"What is {i}+{i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(6)]
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in part))
    cfg = OmegaConf.load(CONF_DIR / "prompts" / "gsm8k.yaml")
    cfg.path, cfg.name = "json", None
    cfg.data_files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    cfg.splits = {"train": "train", "val": "test"}
    source = instantiate(cfg)
    val = list(source.rows("val"))
    assert len(val) == 2 and len(list(source.rows("train"))) == 4
    assert val[0]["prompt"].startswith("What is 4+4?\n") and "<reasoning>" in val[0]["prompt"]
    assert GSM8KReward()(["The answer is 8.", "9"], [r["prompt"] for r in val], answer=[r["answer"] for r in val]) \
        == [1.0, 0.0]
    missing = HubPrompts(path="json", data_files=str(tmp_path / "train.jsonl"), prompt_field="problem",
                         splits={"train": "train"})
    with pytest.raises(RewardError, match="no field"):
        list(missing.rows("train"))


def test_hub_prompts_offline_names_the_local_alternative():
    source = HubPrompts(path="no-such-org/no-such-dataset-xyz", prompt_field="question")
    with pytest.raises(RewardError, match="local"):
        list(source.rows("train"))


# -- every config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((CONF_DIR / "reward").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_reward_config_instantiates_and_scores(path):
    reward = as_reward_set(instantiate(OmegaConf.load(path)))
    columns = {"answer": ["#### 4"], "puzzle": ["1030001221004301"], "solution": ["1234341221434321"],
               "numbers": [[2, 2]], "target": [4]}
    parts = reward.components(["<answer>2+2</answer>"], ["2+2="], **columns)
    assert set(parts) == set(reward.rewards) and all(len(v) == 1 for v in parts.values())
    clone = pickle.loads(pickle.dumps(reward))  # travels to DDP ranks and data-loader workers
    assert clone.components(["<answer>2+2</answer>"], ["2+2="], **columns) == parts


@pytest.mark.parametrize("path", sorted((CONF_DIR / "prompts").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_prompts_config_instantiates_lazily(path):
    source = instantiate(OmegaConf.load(path))  # hub sources load nothing until rows() is called
    assert callable(source.rows)
    if not isinstance(source, HubPrompts):
        cfg = OmegaConf.load(path)
        for key in ("num_train", "num_val"):
            if key in cfg:
                cfg[key] = 8
        source = instantiate(cfg)
        row = next(source.rows("val"))
        assert "prompt" in row
        assert next(pickle.loads(pickle.dumps(source)).rows("val")) == row


def test_no_reward_module_calls_eval_or_exec():
    package = Path(dlm.rewards.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"eval", "exec", "compile", "__import__"}, f"{path.name} calls {node.func.id}"
