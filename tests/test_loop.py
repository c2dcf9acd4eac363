"""The trial loop (search/driver.py `Loop`): a strategy with nothing new to try ends the trials early, and a
resumed run stops at the same place without training again."""

from onnxconet.search.base import Objective, Strategy, Trial, TrialState
from onnxconet.search.driver import Loop


class Few(Strategy):
    """Hands out `n` configurations, then None (dmasking when the budget leaves nothing new)."""

    def __init__(self, n: int) -> None:
        super().__init__(space=None, objective=Objective(0.5), seed=0)
        self.n, self.asked = n, 0

    def ask(self):
        self.asked += 1
        return {0: self.asked} if self.asked <= self.n else None


class Scored:
    """An evaluator that scores widths without training; remembers what it ran."""

    cg = None

    def __init__(self) -> None:
        self.ran: list[int] = []

    def run(self, number: int, widths: dict[int, int]):
        self.ran.append(number)
        return (
            Trial(number, dict(widths), TrialState.COMPLETE, accuracy=widths[0] / 10, ratio=0.4),
            None,
            None,
        )


def test_a_strategy_with_nothing_new_ends_the_trials_and_a_resume_stops_there(tmp_path):
    events = []
    loop = Loop(
        Few(2), Scored(), Objective(0.5), tmp_path, trials=5, progress=lambda e, d: events.append((e, d))
    )
    loop.run()
    assert loop.evaluator.ran == [0, 1] and [r["trial"] for r in loop.records] == [0, 1]
    assert loop.best.number == 1
    stops = [d["text"] for e, d in events if e == "stage"]
    assert stops == [
        "base: no configuration left that no trial has trained; the search stops after 2 of 5 trials"
    ]
    _, records = loop.history.read()
    again = Loop(Few(2), Scored(), Objective(0.5), tmp_path, trials=5)
    again.replay(records)
    again.run()
    assert again.evaluator.ran == [] and len(again.history.read()[1]) == 2 and again.best.number == 1
