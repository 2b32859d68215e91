"""Generate the embedded GSM8K-style math word problems in data/gsm8k-mini.

Each output line is a JSON object ``{"question": ..., "answer": ...}`` in the GSM8K
layout: a worked solution whose arithmetic carries calculator annotations
(``3*4=<<3*4=12>>12``), ending in the line ``#### <integer>`` without thousands
separators. Every number in a solution is computed from the sampled operands, never
typed in, and the final number is the value of the last step.

The output depends only on ``SEED`` and this file, so a second run writes byte-identical
files. ``--check`` regenerates in memory and compares with the files on disk.

Usage:
    python data/generate_problems.py            # write train.jsonl and heldout.jsonl
    python data/generate_problems.py --check    # exit 1 if the files on disk differ
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import operator
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

SEED = 20240917
TRAIN_SIZE = 400
HELDOUT_SIZE = 64
OUTPUT_DIR = Path(__file__).resolve().parent / "gsm8k-mini"

NAMES = [
    "Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kofi", "Lena",
    "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf",
]
_OPERATORS: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def evaluate(expression: str) -> Fraction:
    """Evaluate an expression of integer literals, + - * / and brackets exactly."""
    return _evaluate_node(ast.parse(expression, mode="eval").body)


def _evaluate_node(node: ast.expr) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate_node(node.left), _evaluate_node(node.right))
    raise ValueError(f"unsupported syntax in expression: {ast.dump(node)}")


@dataclass(frozen=True)
class Step:
    """One calculator step: its integer value and its annotated text."""

    value: int
    text: str

    def __str__(self) -> str:
        return self.text


class Solution:
    """The lines of a worked answer and the value of its latest calculator step."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.last_value: int | None = None

    def calc(self, expression: str, unit: str = "") -> Step:
        """Compute ``expression`` and annotate it as GSM8K does: ``2*3=<<2*3=6>>6``.

        ``unit`` goes before the result, as GSM8K writes ``$`` before money. Raises
        ValueError unless the result is a non-negative integer, because each template
        chooses its operands so that every step is whole.
        """
        exact = evaluate(expression)
        if exact.denominator != 1 or exact < 0:
            raise ValueError(f"step {expression} = {exact} is not a non-negative integer")
        self.last_value = int(exact)
        return Step(self.last_value, f"{expression}={unit}<<{expression}={self.last_value}>>{self.last_value}")

    def say(self, line: str) -> None:
        self.lines.append(line)

    def render(self) -> str:
        if self.last_value is None:
            raise ValueError("a solution needs at least one calculator step")
        return "\n".join([*self.lines, f"#### {self.last_value}"])


def show(number: int) -> str:
    """Format a number for a question text, with thousands separators from 10,000 up.

    GSM8K questions use separators too; its ``####`` lines and annotations never do.
    """
    return f"{number:,}" if number >= 10_000 else str(number)


# Templates. Each one samples operands, writes the worked answer into ``s`` and returns
# the question. Operands are chosen so that every division and percentage is exact.


def shopping_change(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    notebooks, notebook_price = rng.randint(2, 6), rng.randint(2, 9)
    pens, pen_price = rng.randint(2, 8), rng.randint(1, 4)
    paid = 50 if notebooks * notebook_price + pens * pen_price < 50 else 100
    notebook_cost = s.calc(f"{notebooks}*{notebook_price}", "$")
    pen_cost = s.calc(f"{pens}*{pen_price}", "$")
    s.say(f"The notebooks cost {notebook_cost}.")
    s.say(f"The pens cost {pen_cost}.")
    total = s.calc(f"{notebook_cost.value}+{pen_cost.value}", "$")
    s.say(f"Together they cost {total}.")
    s.say(f"{name} gets back {s.calc(f'{paid}-{total.value}', '$')} in change.")
    return (
        f"{name} buys {notebooks} notebooks that cost ${notebook_price} each and {pens} pens that cost "
        f"${pen_price} each. "
        f"{name} pays with a ${paid} bill. How much change does {name} get?"
    )


def ages_sum(rng: random.Random, s: Solution) -> str:
    first, second, third = rng.sample(NAMES, 3)
    age, times, younger = rng.randint(4, 15), rng.randint(2, 4), rng.randint(2, 6)
    second_age = s.calc(f"{age}*{times}")
    s.say(f"{second} is {second_age} years old.")
    third_age = s.calc(f"{second_age.value}-{younger}")
    s.say(f"{third} is {third_age} years old.")
    s.say(f"The sum of their ages is {s.calc(f'{age}+{second_age.value}+{third_age.value}')} years.")
    return (
        f"{first} is {age} years old. {second} is {times} times as old as {first}, and {third} is {younger} "
        f"years younger than {second}. What is the sum of their ages?"
    )


def road_trip(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    speed1, hours1, speed2, hours2 = rng.randint(40, 70), rng.randint(2, 5), rng.randint(20, 60), rng.randint(2, 4)
    first, second = s.calc(f"{speed1}*{hours1}"), s.calc(f"{speed2}*{hours2}")
    s.say(f"In the first part {name} drives {first} miles.")
    s.say(f"In the second part {name} drives {second} miles.")
    s.say(f"In total {name} drives {s.calc(f'{first.value}+{second.value}')} miles.")
    return (
        f"{name} drives at {speed1} miles per hour for {hours1} hours, then at {speed2} miles per hour "
        f"for {hours2} hours. How many miles does {name} drive in total?"
    )


def stickers_fraction(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    denominator = rng.choice([2, 3, 4, 5])
    total = denominator * rng.randint(6, 30)
    given = s.calc(f"{total}/{denominator}")
    lost = rng.randint(1, total - given.value - 1)
    s.say(f"{name} gives away {given} stickers.")
    s.say(f"{name} has {s.calc(f'{total}-{given.value}-{lost}')} stickers left.")
    return (
        f"{name} has {total} stickers. {name} gives 1/{denominator} of them to a sister and then "
        f"loses {lost}. How many stickers does {name} have left?"
    )


def discount_purchase(rng: random.Random, s: Solution) -> str:
    name, item = rng.choice(NAMES), rng.choice(["jacket", "lamp", "backpack", "chair", "board game"])
    percent = rng.choice([10, 20, 25, 50])
    price = rng.randint(2, 15) * (100 // math.gcd(100, percent))
    count = rng.randint(2, 5)
    discount = s.calc(f"{price}*{percent}/100", "$")
    s.say(f"The discount is {discount} per {item}.")
    sale = s.calc(f"{price}-{discount.value}", "$")
    s.say(f"Each {item} costs {sale}.")
    s.say(f"{name} pays {s.calc(f'{sale.value}*{count}', '$')}.")
    return (
        f"A {item} costs ${price}. The store takes {percent}% off the price. {name} buys {count} of them. "
        f"How much does {name} pay?"
    )


def yearly_salary(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    monthly, percent = rng.randint(24, 90) * 100, rng.choice([5, 10, 15, 20])
    rise = s.calc(f"{monthly}*{percent}/100", "$")
    s.say(f"The raise is {rise} per month.")
    new = s.calc(f"{monthly}+{rise.value}", "$")
    s.say(f"{name} now earns {new} per month.")
    s.say(f"In a year {name} earns {s.calc(f'{new.value}*12', '$')}.")
    return (
        f"{name} earns ${show(monthly)} a month and gets a {percent}% raise. "
        f"How much does {name} earn in a year after the raise?"
    )


def recipe_scaling(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    cups, cookies, batches = rng.randint(2, 5), rng.choice([12, 16, 20, 24, 30]), rng.randint(2, 9)
    wanted = cookies * batches
    count = s.calc(f"{wanted}/{cookies}")
    s.say(f"{name} needs {count} batches.")
    s.say(f"{name} needs {s.calc(f'{count.value}*{cups}')} cups of flour.")
    return (
        f"A recipe uses {cups} cups of flour to make {cookies} cookies. {name} wants to make {wanted} "
        f"cookies. How many cups of flour does {name} need?"
    )


def book_pages(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    monday, daily, days = rng.randint(10, 40), rng.randint(10, 30), rng.randint(2, 6)
    pages = monday * 3 + daily * days + rng.randint(20, 200)
    tuesday = s.calc(f"{monday}*2")
    s.say(f"On Tuesday {name} reads {tuesday} pages.")
    later = s.calc(f"{daily}*{days}")
    s.say(f"Over the next days {name} reads {later} pages.")
    s.say(f"There are {s.calc(f'{pages}-{monday}-{tuesday.value}-{later.value}')} pages left.")
    return (
        f"A book has {pages} pages. {name} reads {monday} pages on Monday, twice as many on Tuesday, "
        f"and {daily} pages a day for the next {days} days. How many pages are left?"
    )


def bakery_profit(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    loaves, cost, unsold = rng.randint(20, 80), rng.randint(1, 3), rng.randint(1, 9)
    price = cost + rng.randint(2, 5)
    sold = s.calc(f"{loaves}-{unsold}")
    s.say(f"{name} sells {sold} loaves.")
    income, spent = s.calc(f"{sold.value}*{price}", "$"), s.calc(f"{loaves}*{cost}", "$")
    s.say(f"The sales bring in {income} and the baking costs {spent}.")
    s.say(f"The profit is {s.calc(f'{income.value}-{spent.value}', '$')}.")
    return (
        f"{name} bakes {loaves} loaves of bread. Each loaf costs ${cost} to make and sells for ${price}. "
        f"{name} sells all but {unsold} loaves. What is {name}'s profit?"
    )


def town_population(rng: random.Random, s: Solution) -> str:
    town = rng.choice(["Millbrook", "Oakdale", "Riverton", "Stonefield", "Westport"])
    percent, retired_denominator = rng.choice([20, 25, 30, 40]), rng.choice([3, 4, 5])
    people = 100 * retired_denominator * rng.randint(40, 900)
    children = s.calc(f"{people}*{percent}/100")
    s.say(f"There are {children} children.")
    adults = s.calc(f"{people}-{children.value}")
    s.say(f"There are {adults} adults.")
    retired = s.calc(f"{adults.value}/{retired_denominator}")
    s.say(f"Of them, {retired} are retired.")
    s.say(f"So {s.calc(f'{adults.value}-{retired.value}')} adults are not retired.")
    return (
        f"{town} has {show(people)} people. {percent}% of them are children, and 1/{retired_denominator} "
        f"of the adults are retired. How many adults in {town} are not retired?"
    )


def field_trip_vans(rng: random.Random, s: Solution) -> str:
    classes, size, seats = rng.randint(3, 8), rng.randint(18, 30), rng.choice([7, 8, 10, 12])
    # The smallest number of teachers, at least 2, that fills the last van exactly.
    teachers = -(classes * size) % seats
    teachers += seats if teachers < 2 else 0
    students = s.calc(f"{classes}*{size}")
    s.say(f"There are {students} students.")
    people = s.calc(f"{students.value}+{teachers}")
    s.say(f"With the teachers, {people} people go.")
    s.say(f"They need {s.calc(f'{people.value}/{seats}')} vans.")
    return (
        f"A school sends {classes} classes of {size} students on a trip, along with {teachers} teachers. "
        f"Each van holds {seats} people and every van is full. How many vans do they need?"
    )


def running_hours(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    laps, minutes = rng.randint(2, 12), rng.choice([3, 4, 5, 6, 10, 12, 15, 20])
    days = 60 // math.gcd(laps * minutes, 60) * rng.randint(2, 4)
    daily = s.calc(f"{laps}*{minutes}")
    s.say(f"{name} runs {daily} minutes a day.")
    total = s.calc(f"{daily.value}*{days}")
    s.say(f"Over {days} days that is {total} minutes.")
    s.say(f"That is {s.calc(f'{total.value}/60')} hours.")
    return (
        f"{name} runs {laps} laps every day, and each lap takes {minutes} minutes. "
        f"How many hours does {name} run in {days} days?"
    )


def fuel_cost(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    mileage, price = rng.choice([20, 25, 30, 35, 40]), rng.randint(3, 5)
    one_way = mileage * rng.randint(2, 9)
    distance = s.calc(f"{one_way}*2")
    s.say(f"The round trip is {distance} miles.")
    gallons = s.calc(f"{distance.value}/{mileage}")
    s.say(f"The car uses {gallons} gallons.")
    s.say(f"The gas costs {s.calc(f'{gallons.value}*{price}', '$')}.")
    return (
        f"{name}'s car goes {mileage} miles on a gallon of gas, which costs ${price}. {name} drives "
        f"{one_way} miles to a lake and back. How much does the gas cost?"
    )


def overtime_pay(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    wage, regular, extra = 2 * rng.randint(6, 20), rng.choice([30, 35, 40]), rng.randint(2, 12)
    rate = s.calc(f"{wage}*3/2", "$")
    s.say(f"The overtime rate is {rate} per hour.")
    base, bonus = s.calc(f"{regular}*{wage}", "$"), s.calc(f"{extra}*{rate.value}", "$")
    s.say(f"{name} earns {base} for regular hours and {bonus} for overtime.")
    s.say(f"{name} earns {s.calc(f'{base.value}+{bonus.value}', '$')} in total.")
    return (
        f"{name} earns ${wage} an hour for the first {regular} hours of a week and 1.5 times that for "
        f"overtime. This week {name} works {regular + extra} hours. How much does {name} earn?"
    )


def dinner_split(rng: random.Random, s: Solution) -> str:
    friends, percent = rng.randint(2, 6), rng.choice([10, 15, 20])
    bill = 20 * friends * rng.randint(1, 6)
    tip = s.calc(f"{bill}*{percent}/100", "$")
    s.say(f"The tip is {tip}.")
    total = s.calc(f"{bill}+{tip.value}", "$")
    s.say(f"The total is {total}.")
    s.say(f"Each friend pays {s.calc(f'{total.value}/{friends}', '$')}.")
    return (
        f"{friends} friends have dinner that costs ${bill}. They add a {percent}% tip and split the total "
        f"evenly. How much does each friend pay?"
    )


def factory_crates(rng: random.Random, s: Solution) -> str:
    crate = rng.choice([12, 24, 25, 50])
    hourly, hours, days = crate * rng.randint(10, 60), rng.randint(6, 16), rng.randint(5, 30)
    daily = s.calc(f"{hourly}*{hours}")
    s.say(f"The factory makes {daily} bottles a day.")
    total = s.calc(f"{daily.value}*{days}")
    s.say(f"In {days} days it makes {total} bottles.")
    s.say(f"That fills {s.calc(f'{total.value}/{crate}')} crates.")
    return (
        f"A factory makes {hourly} bottles an hour and runs {hours} hours a day. Bottles are packed "
        f"{crate} to a crate. How many crates does it fill in {days} days?"
    )


def budget_fractions(rng: random.Random, s: Solution) -> str:
    name = rng.choice(NAMES)
    rent_share, food_share = rng.choice([2, 3, 4]), rng.choice([3, 4, 5])
    money = rent_share * food_share * rng.randint(20, 250)
    rent = s.calc(f"{money}/{rent_share}", "$")
    s.say(f"Rent costs {rent}.")
    rest = s.calc(f"{money}-{rent.value}", "$")
    s.say(f"{name} has {rest} after rent.")
    food = s.calc(f"{rest.value}/{food_share}", "$")
    s.say(f"Groceries cost {food}.")
    s.say(f"{name} has {s.calc(f'{rest.value}-{food.value}', '$')} left.")
    return (
        f"{name} has ${show(money)}. {name} spends 1/{rent_share} of it on rent and 1/{food_share} of what "
        f"remains on groceries. How much money does {name} have left?"
    )


def tank_filling(rng: random.Random, s: Solution) -> str:
    inflow, leak, minutes = rng.randint(8, 20), rng.randint(1, 5), rng.randint(5, 40)
    start = rng.randint(10, 100)
    capacity = start + (inflow - leak) * minutes
    net = s.calc(f"{inflow}-{leak}")
    s.say(f"The tank gains {net} liters a minute.")
    missing = s.calc(f"{capacity}-{start}")
    s.say(f"It needs {missing} more liters.")
    s.say(f"It is full after {s.calc(f'{missing.value}/{net.value}')} minutes.")
    return (
        f"A tank holds {capacity} liters and already has {start} liters in it. A hose adds {inflow} liters "
        f"a minute while a leak loses {leak} liters a minute. How many minutes until the tank is full?"
    )


TEMPLATES: list[Callable[[random.Random, Solution], str]] = [
    shopping_change, ages_sum, road_trip, stickers_fraction, discount_purchase, yearly_salary,
    recipe_scaling, book_pages, bakery_profit, town_population, field_trip_vans, running_hours,
    fuel_cost, overtime_pay, dinner_split, factory_crates, budget_fractions, tank_filling,
]


def generate_problems(seed: int = SEED, count: int = TRAIN_SIZE + HELDOUT_SIZE) -> list[dict[str, str]]:
    """Sample ``count`` problems with distinct questions.

    Each round visits every template once in a freshly shuffled order, so the templates
    are about equally represented in both splits.
    """
    rng = random.Random(seed)
    problems: list[dict[str, str]] = []
    seen_questions: set[str] = set()
    while len(problems) < count:
        order = list(TEMPLATES)
        rng.shuffle(order)
        for template in order[: count - len(problems)]:
            solution = Solution()
            question = template(rng, solution)
            if question not in seen_questions:
                seen_questions.add(question)
                problems.append({"question": question, "answer": solution.render()})
    return problems


def build_splits(seed: int = SEED) -> dict[str, bytes]:
    """Return the bytes of each split file, keyed by file name. The splits share no question."""
    problems = generate_problems(seed, TRAIN_SIZE + HELDOUT_SIZE)
    splits = {"train.jsonl": problems[:TRAIN_SIZE], "heldout.jsonl": problems[TRAIN_SIZE:]}
    return {name: "".join(json.dumps(row) + "\n" for row in rows).encode("ascii") for name, rows in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the embedded GSM8K-style problems.")
    parser.add_argument("--check", action="store_true", help="compare the files on disk with a fresh generation")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR, help="directory of the JSONL files")
    args = parser.parse_args(argv)

    splits = build_splits()
    if args.check:
        stale = [name for name in splits if not _has_content(args.output_dir / name, splits[name])]
        if stale:
            print(f"out of date in {args.output_dir}: {', '.join(stale)}; run python data/generate_problems.py")
            return 1
        print(f"up to date: {', '.join(splits)} in {args.output_dir}")
        return 0

    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, content in splits.items():
        (args.output_dir / name).write_bytes(content)
    print(f"wrote {TRAIN_SIZE} train and {HELDOUT_SIZE} held-out problems to {args.output_dir}")
    return 0


def _has_content(path: Path, expected: bytes) -> bool:
    return path.is_file() and path.read_bytes() == expected


if __name__ == "__main__":
    sys.exit(main())
