"""The search: strategy contract, resume after a kill, CLI smoke, bad inputs, unreachable budget."""

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from onnxconet.cli import app
from onnxconet.commands.search import SearchConfig, run_search
from onnxconet.errors import BudgetError, OnnxconetError
from onnxconet.prepare import prepare
from onnxconet.search.anneal import AnnealConfig, AnnealStrategy
from onnxconet.search.base import Objective, Trial, TrialState
from onnxconet.search.baselines import L1Strategy, RandomStrategy
from onnxconet.search.cost import CostModel
from onnxconet.search.judge import DECIDING_ROOM
from onnxconet.space import WidthSpace
from tests.conftest import TINY, search_cfg

runner = CliRunner()


def fake_trial(n, widths, space, rng, fail=False):
    if fail:
        return Trial(n, widths, TrialState.FAILED, error="boom")
    frac = np.mean([widths[g.id] / g.hi for g in space])
    metrics = {g.id: float(rng.random()) for g in space}
    return Trial(
        n, widths, TrialState.COMPLETE, accuracy=0.5 + 0.4 * frac, ratio=float(frac), metrics=metrics
    )


@pytest.mark.parametrize("kind", ["anneal", "random", "l1"])
def test_strategy_contract(tiny_graph, kind):
    """Widths stay in the space, the budget is respected by the proposals, a seed replays exactly, and
    failed trials are tolerated."""

    def make(seed):
        space = WidthSpace(tiny_graph, min_ratio=0.25)
        cost = CostModel(tiny_graph, space, "flops")
        obj = Objective(0.5)
        if kind == "anneal":
            return AnnealStrategy(space, obj, cost, cost.rescale(space.full(), 0.5), seed=seed), space, cost
        cls = RandomStrategy if kind == "random" else L1Strategy
        return cls(space, obj, cost, seed=seed), space, cost

    runs = []
    for _ in range(2):
        strat, space, cost = make(seed=3)
        rng = np.random.default_rng(0)
        asked = []
        for n in range(6):
            w = strat.ask()
            assert space.contains(w), w
            assert cost.predict(w) <= 0.5 + 1e-9
            asked.append(w)
            strat.tell(fake_trial(n, w, space, rng, fail=(n == 2)))
        runs.append(asked)
    assert runs[0] == runs[1]
    if kind != "l1":
        assert len({json.dumps(w, sort_keys=True) for w in runs[0]}) > 1, "the strategy never moved"


def test_anneal_metropolis_rejects_much_worse(tiny_graph):
    space = WidthSpace(tiny_graph, min_ratio=0.25)
    cost = CostModel(tiny_graph, space, "flops")
    s = AnnealStrategy(space, Objective(0.5), cost, space.uniform(0.5), AnnealConfig(t0=1e-4), seed=0)
    w = s.ask()
    assert s.tell(Trial(0, w, TrialState.COMPLETE, accuracy=0.9, ratio=0.4))["accepted"]
    w = s.ask()
    assert not s.tell(Trial(1, w, TrialState.COMPLETE, accuracy=0.2, ratio=0.4))["accepted"]
    assert s.current.number == 0


cfg = search_cfg


def test_search_end_to_end_and_resume_after_kill(tmp_path, npz_data, monkeypatch):
    from onnxconet.search import evaluate as ev

    real_run = ev.Evaluator.run
    calls = {"n": 0}

    def killed_at_third(self, number, widths, epochs=None):
        calls["n"] += 1
        if number == 2:
            raise KeyboardInterrupt
        return real_run(self, number, widths, epochs)

    monkeypatch.setattr(ev.Evaluator, "run", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg(tmp_path, npz_data, pretrain_epochs=5))
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    first = [ln for ln in lines if ln["kind"] == "trial"]
    assert [t["trial"] for t in first] == [0, 1]

    monkeypatch.setattr(ev.Evaluator, "run", real_run)
    seen = []
    res = run_search(
        cfg(tmp_path, npz_data, resume=True, pretrain_epochs=5),
        progress=lambda e, d: seen.append(d["trial"]) if e == "trial_start" else None,
    ).to_json()
    assert seen == [2], "resume redid a finished trial"
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    trials = [ln for ln in lines if ln["kind"] == "trial"]
    assert [t["trial"] for t in trials] == [0, 1, 2]
    assert trials[:2] == first  # finished trials untouched
    out = tmp_path / "run"
    for f in ("best.onnx", "baseline.onnx", "result.json", "report.md", "pareto.png", "best_widths.json"):
        assert (out / f).is_file(), f
    best = res["best"]
    assert best["flops_ratio"] <= 0.6 + 1e-9 and best["budget_met"]
    assert best["max_abs_diff"] < 1e-4
    assert 0 <= best["accuracy"] <= 1 and res["baseline"]["accuracy"] > 0.35  # chance is 0.2
    assert set(res) >= {"config", "baseline", "best", "trials", "pareto"}
    assert json.loads((out / "result.json").read_text())["best"]["trial"] == best["trial"]
    # provenance: the code that produced it, where it was measured (tests/test_provenance.py: the versions)
    from tests.test_provenance import running_versions

    prov = res["provenance"]
    assert {k: prov[k] for k in running_versions()} == running_versions()
    assert prov["provider"] == "CPUExecutionProvider" == best["latency"]["provider"]
    assert prov["threads"] == 1 and prov["cpu"]
    meta = {p.key: p.value for p in onnx.load(out / "best.onnx").metadata_props}
    assert {k: meta[f"onnxconet.provenance.{k}"] for k in prov if prov[k] is not None} == {
        k: str(v) for k, v in prov.items() if v is not None
    }


def test_search_cli_smoke_latency_budget(tmp_path, npz_data):
    out = tmp_path / "cli"
    r = runner.invoke(
        app,
        [
            "search",
            TINY,
            "--data",
            npz_data,
            "--trials",
            "2",
            "--epochs-per-trial",
            "1",
            "--final-epochs",
            "1",
            "--pretrain-epochs",
            "1",
            "--budget",
            "1.0",  # a 16x16 toy at 2 threads: its smallest widths measured 0.83-1.23 of it on this VM (fixed costs)
            "--provider",
            "cpu",
            "--threads",
            "2",
            "--out",
            str(out),
            "--json",
            "--min-ratio",
            "0.25",
            "--latency-seconds",
            "0.4",
            "--deployed-pairs",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["budget"]["on"] == "latency" and res["best"]["latency_ms"] > 0
    assert (out / "best.onnx").is_file()
    # the budget is judged as deployed, at the deployment's threads and at 1 thread, and said so everywhere
    best, lat = res["best"], res["best"]["latency"]
    assert lat["method"] == "isolated-processes" and lat["ratio"] == best["latency_ratio"]
    assert best["budget_met"] == (best["latency_ratio"] <= res["budget"]["ratio"])
    assert lat["threads"] == 2 and set(lat["by_threads"]) == {"1", "2"}
    assert (
        isinstance(lat["fewer_threads_faster"], bool) and 4 <= len(lat["ratios"]) <= 8
    )  # --deployed-pairs 2: the verdict takes twice, pairs added on spread
    assert lat["ratio_ci"][0] <= np.median(lat["ratios"]) <= lat["ratio_ci"][1]
    meta = {p.key: p.value for p in onnx.load(out / "best.onnx").metadata_props}
    assert float(meta["onnxconet.latency_ratio"]) == pytest.approx(best["latency_ratio"], abs=1e-4)
    assert (
        "as deployed" in meta["onnxconet.latency_measured"]
        and "2 intra-op threads" in meta["onnxconet.latency_measured"]
    )
    report = (out / "report.md").read_text()
    assert "## Latency as deployed" in report and "| intra-op threads |" in report
    r = runner.invoke(app, ["search", TINY, "--data", npz_data, "--out", str(out)])
    assert r.exit_code == 1 and "--resume" in r.stderr


def test_final_from_original_cuts_the_best_widths_from_the_original(tmp_path, npz_data, tiny_graph):
    """--final-from original: best.onnx holds the original's weights at the best widths (no fine-tuning here),
    not the trained trial's."""
    import onnx
    from onnx import numpy_helper

    from onnxconet.surgery.inherit import WeightBank

    res = run_search(cfg(tmp_path, npz_data, trials=2, final_epochs=0, final_from="original")).to_json()
    out = tmp_path / "run"
    prep = prepare(TINY)
    prep.loaded.module.load_state_dict(torch.load(out / "teacher.pt", weights_only=True))
    bank = WeightBank(prep.loaded.module)
    widths = {int(k): v for k, v in res["best"]["widths"].items()}
    expect = bank.cut(
        tiny_graph.param_slices(tiny_graph.keep_mask(widths, bank.scores(tiny_graph)))
    ).state_dict()
    got = {i.name: numpy_helper.to_array(i) for i in onnx.load(out / "best.onnx").graph.initializer}
    checked = [k for k, v in expect.items() if v.dim() >= 2 and k in got]  # conv / linear weights
    assert len(checked) >= 3
    for k in checked:
        np.testing.assert_array_equal(got[k], expect[k].numpy(), err_msg=k)
    with pytest.raises(OnnxconetError, match="--final-from"):
        run_search(cfg(tmp_path, npz_data, final_from="later"))


# ("trial": the bank accumulates; -m slow, to keep the default run under 15 minutes on 2 cores)
@pytest.mark.parametrize("final_from", ["original", pytest.param("trial", marks=pytest.mark.slow)])
def test_trials_are_paired_when_the_search_only_ranks_widths(tmp_path, npz_data, monkeypatch, final_from):
    """--final-from original: every trial is cut from the original and trains on the same batches, so the same
    widths score the same whenever they are tried (differences between trials come from the widths). With
    --final-from trial the accepted trials' training accumulates in the bank, so a repeat scores differently.
    anneal's first trial is the uniform widths on the budget (l1's), so the search starts from that baseline."""
    seen = []
    real_ask = AnnealStrategy.ask

    def same_widths(self):
        widths = real_ask(self) if not seen else seen[0]
        seen.append(widths)
        return widths

    monkeypatch.setattr(AnnealStrategy, "ask", same_widths)
    res = run_search(cfg(tmp_path, npz_data, trials=3, max_batches=3, final_from=final_from)).to_json()
    trials = [t for t in res["trials"] if t["state"] == "complete"]
    assert len(trials) == 3 and all(t["widths"] == trials[0]["widths"] for t in trials)
    accs = [t["accuracy"] for t in trials]
    metrics = [t["metrics"] for t in trials]
    if final_from == "original":
        assert accs == [accs[0]] * 3 and metrics == [metrics[0]] * 3
        assert not (tmp_path / "run" / "bank.pt").exists()
    else:
        bank = torch.load(tmp_path / "run" / "bank.pt", weights_only=True)["bank"]
        teacher = torch.load(tmp_path / "run" / "teacher.pt", weights_only=True)
        assert any(not torch.equal(v, teacher[k]) for k, v in bank.items() if k in teacher)  # training kept
    l1 = run_search(
        cfg(tmp_path, npz_data, trials=1, final_epochs=0, strategy="l1", out=str(tmp_path / "l1"))
    ).to_json()
    assert trials[0]["widths"] == l1["trials"][0]["widths"]
    assert l1["best"]["shipped"] == "start"  # a uniform baseline never ships searched widths


def test_mcnemar_needs_significantly_more_fixed_than_broken_images():
    from onnxconet.search.race import mcnemar

    base = np.array([True] * 80 + [False] * 20)
    better = base.copy()
    better[80:92] = True  # fixes 12 images, breaks none: p = 0.5**12
    r = mcnemar(base, better)
    assert r.challenger_wins and r.only_challenger == 12 and r.only_anchor == 0
    assert r.p_value == pytest.approx(0.5**12)
    noisy = better.copy()
    noisy[:8] = False  # fixes 12, breaks 8: P(X >= 12 | n=20) = 0.25
    r = mcnemar(base, noisy)
    assert not r.challenger_wins and r.p_value == pytest.approx(0.2517, abs=1e-3)
    assert not mcnemar(base, base).challenger_wins and mcnemar(base, base).p_value == 1.0
    assert not mcnemar(better, base).challenger_wins  # one-sided: a worse challenger never wins
    with pytest.raises(ValueError, match="length"):
        mcnemar(base, base[:10])


@pytest.mark.parametrize(
    "challenger_wins", [pytest.param(False, marks=pytest.mark.slow), True]
)  # False (28 s): the same race, the other verdict
def test_final_race_ships_the_start_unless_the_search_wins(tmp_path, npz_data, monkeypatch, challenger_wins):
    """--final-from original with anneal: when its best trial is not the uniform start, both get the final
    training and the start ships unless the race says otherwise; the race is recorded in result.json."""
    from dataclasses import replace

    from onnxconet.search import evaluate as ev
    from onnxconet.search import finish as finish_mod
    from onnxconet.search import race

    real_run, real_mcnemar = ev.Evaluator.run, race.mcnemar

    def trial_one_looks_best(self, number, widths, epochs=None):
        trial, model, slices = real_run(self, number, widths, epochs)
        return (replace(trial, accuracy=1.0) if number == 1 else trial), model, slices

    def forced(anchor, challenger, alpha=0.05):
        return replace(real_mcnemar(anchor, challenger, alpha), challenger_wins=challenger_wins)

    def narrower_after_the_start(self):
        start = real_ask(self)
        if self.told == 0:
            return start
        g = next(iter(self.space))
        return {**start, g.id: g.clip(start[g.id] - g.step)}

    real_ask = AnnealStrategy.ask
    monkeypatch.setattr(AnnealStrategy, "ask", narrower_after_the_start)
    monkeypatch.setattr(ev.Evaluator, "run", trial_one_looks_best)
    monkeypatch.setattr(finish_mod, "mcnemar", forced)
    res = run_search(cfg(tmp_path, npz_data, trials=2, final_from="original")).to_json()
    trials = res["trials"]
    assert trials[0]["widths"] != trials[1]["widths"]
    best = res["best"]
    assert best["race"]["anchor"] == 0 and best["race"]["challenger"] == 1
    winner = trials[1] if challenger_wins else trials[0]
    assert best["trial"] == winner["trial"]
    assert {k: best["widths"][k] for k in winner["widths"]} == winner["widths"]
    shipped = best["race"]["challenger_accuracy" if challenger_wins else "anchor_accuracy"]
    assert best["accuracy"] == pytest.approx(shipped, abs=1e-4)  # rounded in the record
    assert "Final race" in (tmp_path / "run" / "report.md").read_text()
    assert best["shipped"] == ("search" if challenger_wins else "start")
    # with --final-from trial there is no race: the best trial ships, and those are searched widths
    res = run_search(cfg(tmp_path, npz_data, trials=2, out=str(tmp_path / "t"))).to_json()
    assert "race" not in res["best"] and res["best"]["trial"] == 1 and res["best"]["shipped"] == "search"


def _fake_run(cg, trials, objective, judge_ratio, anchor=None, half=0.0):
    """A `SearchRun` over recorded `trials` whose judge measures every candidate at `judge_ratio(model)`, with a
    CI of +- `half`; `judge.rooms` records the room each measurement asked for."""
    from types import SimpleNamespace

    from onnxconet.search.finish import SearchRun

    def deployed(model, room=None):
        judge.rooms.append(room)
        r = judge_ratio(model)
        return SimpleNamespace(ratio=r, ratio_ci=[r - half, r + half])

    judge = SimpleNamespace(deployed=deployed, rooms=[])
    bank = SimpleNamespace(scores=lambda g: g.l1_scores())
    strategy = SimpleNamespace(anchor=lambda: anchor, reinit=False)
    loop = SimpleNamespace(
        best=max((t for t in trials if objective.feasible(t)), key=objective, default=None),
        objective=objective, strategy=strategy, records=[t.to_json() for t in trials],
        evaluator=SimpleNamespace(cg=cg, bank=bank, judge=judge),
    )  # fmt: skip
    return SearchRun(loop, None), judge


def _fake_ctx(judge, budget, **cfg_kw):
    from types import SimpleNamespace

    from onnxconet.search.config import Budget

    return SimpleNamespace(
        cfg=SearchConfig(**cfg_kw), budget=Budget("latency", budget), judge=judge, stage=lambda text: None
    )


def test_race_start_must_stay_within_the_budget_when_re_measured(tiny_graph):
    from onnxconet.search.finish import race_anchor

    space = WidthSpace(tiny_graph, min_ratio=0.25)
    start, other = space.uniform(0.5), space.uniform(0.25)
    trials = [
        Trial(0, start, TrialState.COMPLETE, accuracy=0.7, ratio=0.49),
        Trial(1, other, TrialState.COMPLETE, accuracy=0.9, ratio=0.45),
    ]
    for measured, expect in ((0.48, (trials[0], 0.48)), (0.52, (None, 0.52))):  # over the budget: no race
        run, judge = _fake_run(tiny_graph, trials, Objective(0.5), lambda m, r=measured: r, anchor=start)
        assert race_anchor(_fake_ctx(judge, 0.5, final_from="original"), run, trials[1]) == expect
    run, judge = _fake_run(tiny_graph, trials, Objective(0.5), lambda m: 0.48, anchor=start)
    assert race_anchor(_fake_ctx(judge, 0.5, final_from="original"), run, trials[0])[0] is None  # start won
    assert race_anchor(_fake_ctx(judge, 0.5, final_from="trial"), run, trials[1])[0] is None
    run, judge = _fake_run(tiny_graph, trials, Objective(0.5), lambda m: 0.48, anchor=None)
    assert race_anchor(_fake_ctx(judge, 0.5, final_from="original"), run, trials[1])[0] is None  # no start


def test_reseed_loader_replays_the_first_pass(npz_data):
    from onnxconet.data import load_data, make_loaders
    from onnxconet.search.evaluate import reseed_loader

    train, _, _ = make_loaders(load_data(npz_data, (1, 3, 16, 16), seed=0), 32, seed=3)
    first = [y for _, y in train]
    second = [y for _, y in train]
    assert any(
        not torch.equal(a, b) for a, b in zip(first, second, strict=True)
    )  # a plain second pass reshuffles
    reseed_loader(train, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in train], strict=True))


def test_reachability_is_decided_as_deployed(tiny_graph):
    """Whether the smallest widths meet the budget is decided on the deployed measurement (several process
    pairs), never on one in-loop measurement; the refusal names the figure and its spread."""
    from types import SimpleNamespace

    from onnxconet.search.config import Budget
    from onnxconet.search.setup import check_reachable

    class Judge:
        def __init__(self, ratio):
            self.ratio, self.calls = ratio, 0

        def measure(self, candidate):
            raise AssertionError("an in-loop measurement must not decide reachability")

        def deployed(self, candidate):
            self.calls += 1
            return SimpleNamespace(
                ratio=self.ratio, rounds=4, ratio_p10=self.ratio - 0.01, ratio_p90=self.ratio + 0.01
            )

    def ctx(judge, on, budget):
        return SimpleNamespace(
            cfg=SearchConfig(budget_on=on, min_ratio=0.25), budget=Budget(on, budget), judge=judge,
            cg=tiny_graph, stage=lambda text: None,
        )  # fmt: skip

    space = WidthSpace(tiny_graph, min_ratio=0.25)
    cost = CostModel(tiny_graph, space, "latency")
    j = Judge(0.28)
    check_reachable(ctx(j, "latency", 0.3), space, cost)
    assert j.calls == 1 and cost.points[-1][1] == 0.28  # the cost model learns from it
    j = Judge(0.33)
    with pytest.raises(BudgetError, match=r"ratio of 0.330 as deployed \(4 process pairs: 0.320-0.340\)"):
        check_reachable(ctx(j, "latency", 0.3), space, CostModel(tiny_graph, space, "latency"))
    check_reachable(ctx(j, "flops", 0.9), space, CostModel(tiny_graph, space, "flops"))
    assert j.calls == 1  # FLOPs are counted, not measured


def test_unreachable_budget_is_an_error_before_training(tmp_path, npz_data):
    with pytest.raises(BudgetError, match="out of reach"):
        run_search(cfg(tmp_path, npz_data, budget="0.01", pretrain_epochs=0))
    assert not (tmp_path / "run" / "history.jsonl").exists()


@pytest.mark.parametrize(
    ("data", "needle"),
    [("/nonexistent/folder", "does not exist"), ("digits", "classes"), ("npz:/nope.npz", "nope.npz")],
)
def test_bad_data_one_line(tmp_path, data, needle):
    r = runner.invoke(app, ["search", TINY, "--data", data, "--out", str(tmp_path / "o"), "--trials", "1"])
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output


def test_empty_image_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    r = runner.invoke(app, ["search", TINY, "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "imgs" in r.stderr


def test_best_is_confirmed_by_a_second_measurement(tiny_graph, tmp_path, monkeypatch):
    """The most accurate feasible trial re-measures over the budget: the next one that fits (within the budget with
    the room its CI leaves for the final check) is finished instead, and the re-measured ratios are reported;
    nothing fits -> the most accurate within the budget; nothing within -> the lowest re-measured."""
    from onnxconet.surgery.onnx import slice_onnx

    space = WidthSpace(tiny_graph, min_ratio=0.25)
    full = {g.id: g.hi for g in space}
    half = space.uniform(0.5)
    small = space.uniform(0.25)
    trials = [
        Trial(0, full, TrialState.COMPLETE, accuracy=0.99, ratio=0.48),  # measured in budget, really 0.6
        Trial(1, half, TrialState.COMPLETE, accuracy=0.95, ratio=0.45),
        Trial(2, small, TrialState.COMPLETE, accuracy=0.90, ratio=0.30),
        Trial(3, full, TrialState.COMPLETE, accuracy=1.0, ratio=0.9),  # infeasible
    ]

    def size(model):  # output channels of every conv: tells the three trials' candidates apart
        return sum(int(i.dims[0]) for i in model.graph.initializer if len(i.dims) == 4)

    true_ratio = {}
    for t, r in zip(trials[:3], (0.6, 0.47, 0.31), strict=True):
        true_ratio[size(slice_onnx(tiny_graph, tiny_graph.keep_mask(t.widths)))] = r
    assert len(true_ratio) == 3

    from onnxconet.search.finish import confirm_best

    objective = Objective(0.5)
    run, judge = _fake_run(tiny_graph, trials, objective, lambda model: true_ratio[size(model)], half=0.006)
    run.loop.best = trials[0]
    best, checks = confirm_best(_fake_ctx(judge, 0.5), run)
    assert best.number == 1 and checks == {0: 0.6, 1: 0.47}
    # each measured until narrow enough to decide
    assert judge.rooms == [pytest.approx(DECIDING_ROOM * 0.5)] * 2

    # 0.47 is within 0.48 but its room (0.012) is not: the trial with room (0.31) is preferred
    margin = confirm_best(_fake_ctx(judge, 0.48), run)
    assert margin[0].number == 2 and margin[1] == {0: 0.6, 1: 0.47, 2: 0.31}
    # a narrow CI (room 0.002) lets 0.47 ship under 0.48, within 3 % of it (a fixed margin threw it away)
    narrow, narrow_judge = _fake_run(tiny_graph, trials, objective, lambda m: true_ratio[size(m)], half=0.001)
    narrow.loop.best = trials[0]
    assert confirm_best(_fake_ctx(narrow_judge, 0.48), narrow)[0].number == 1
    # nothing fits, but within the budget: the most accurate of those
    only = confirm_best(_fake_ctx(judge, 0.315), run)
    assert only[0].number == 2

    tight = confirm_best(_fake_ctx(judge, 0.305), run)
    assert tight[0].number == 2 and set(tight[1]) == {0, 1, 2}  # none within 0.305: the lowest re-measured


def test_best_onnx_that_differs_from_torch_is_not_written(tmp_path, npz_data, monkeypatch):
    """Parity is enforced: when best.onnx's outputs would differ from the fine-tuned torch model's beyond the
    tolerance, the run fails with one line saying by how much, writes no best.onnx, and keeps what --resume
    needs (the history, the trial checkpoint)."""
    from onnxconet.errors import SurgeryError
    from onnxconet.search import finish as finish_mod

    monkeypatch.setattr(finish_mod, "max_rel_diff", lambda a, b: (0.5, 0.05))  # 5 % of the output scale
    with pytest.raises(
        SurgeryError, match=r"differ from the fine-tuned torch model by 0.5 \(5.00% .*not written"
    ):
        run_search(cfg(tmp_path, npz_data, trials=2))
    out = tmp_path / "run"
    assert not (out / "best.onnx").exists() and not (out / "result.json").exists()
    assert (out / "history.jsonl").is_file() and (out / "best_candidate.pt").is_file()
    lines = [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in lines if r["kind"] == "trial"] == [0, 1]


@pytest.mark.parametrize(
    "kw",
    [{}, {"importance": "taylor"}, {"importance": "loss", "start": "smallest", "depth": False},
     {"strategy": "anneal"}, {"strategy": "anneal", "start": "knapsack", "importance": "path"},
     {"strategy": "random", "trials": 5, "depth": True}],
)  # fmt: skip
def test_a_recorded_config_reads_back_as_the_run_was(kw):
    """A worker joining a study rebuilds the run's config from what `config_json` recorded
    (search/parallel.py): the settings left out as defaults must come back as the run had them, whatever the
    strategy's own defaults are (knapsack --importance taylor must not come back as the knapsack's path)."""
    from onnxconet.search.config import config_json
    from onnxconet.search.parallel import _config_args

    cfg = SearchConfig(**kw)
    cfg.check()
    again = SearchConfig(**_config_args(config_json(cfg)))
    again.check()
    keys = ("strategy", "start", "importance", "depth", "trials", "final_epochs")
    assert {k: getattr(again, k) for k in keys} == {k: getattr(cfg, k) for k in keys}
