"""``replica report``: runs read back, never trained: curves, tables across seeds, each config's
difference from the baseline with its interval and verdict, and the paper's and the original
runs' numbers beside them."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .config import NOT_THE_EXPERIMENT
from .errors import ReplicaError
from .pictures import SEPARATION, plot_curves

# -- the evidence: the original runs' logs, and one record per claim of the paper ----------------

@dataclass(frozen=True)
class OriginalRun:
    """One of the 2012 runs as its log ends (docs/spec.md §5): ten-view top-1 / top-5 error (%)."""

    name: str
    dataset: str  # the data it was measured on: ilsvrc2012 (val) or ilsvrc2010 (test)
    top1: float
    top5: float
    also: str = ""  # more from the same log
    paper: str = ""  # where the paper prints it


ORIGINAL = {r.name: r for r in (
    OriginalRun("145", "ilsvrc2012", 40.66, 18.21, paper="Table 2 '1 CNN' 40.7 / 18.2"),
    OriginalRun("145-2010", "ilsvrc2010", 37.47, 17.00, also="centre view 39.02 / 18.30", paper="Table 1 37.5 / 17.0"),
    OriginalRun("145-half", "ilsvrc2010", 39.17, 18.23),
    OriginalRun("148", "ilsvrc2012", 42.03, 19.36),
    OriginalRun("147", "ilsvrc2012", 41.06, 18.51),
)}
DATASETS = {"ilsvrc2012": "ILSVRC-2012 val", "ilsvrc2010": "ILSVRC-2010 test"}


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims that an ablation tests, with all its evidence: the config change
    (``configs/<config>.yaml``), the baseline recipe it is measured against
    (``configs/<baseline>.yaml``: ``tools/reproduce.py`` trains the ablation as that baseline plus
    the change), how much better the paper says the baseline is (top-1, top-5 points; None where
    it gives no number), and the original runs that measured it, ablation and baseline."""

    name: str
    key: str
    value: object
    config: str
    baseline: str = "alexnet-2gpu"
    gain: tuple = (None, None)
    words: str = ""  # the paper's words where it gives no number
    run: str | None = None
    baseline_run: str = "145"

    @property
    def change(self) -> tuple:
        return self.key, self.value

    def paper_text(self) -> str:
        c1, c5 = self.gain
        if c1 is None and c5 is None:
            return self.words
        return f"{self.name} better by {c1 if c1 is not None else '?'} / {c5 if c5 is not None else '?'}" + (
            f" ({self.words})" if self.words else "")

    def original_difference(self) -> tuple | None:
        """(top-1, top-5, 'run − run') of the original runs, or None where none measured it."""
        if self.run is None:
            return None
        a, b = ORIGINAL[self.run], ORIGINAL[self.baseline_run]
        return round(a.top1 - b.top1, 2), round(a.top5 - b.top5, 2), f"{a.name} − {b.name}"


CLAIMS = (
    Claim("two GPUs", "variant", "one-gpu-half", "one-gpu-half", baseline="alexnet-2010", gain=(1.7, 1.2),
          run="145-half", baseline_run="145-2010"),
    Claim("LRN", "norm", False, "no-norm", gain=(1.4, 1.2), run="148"),
    Claim("overlapping pooling", "overlap", False, "no-overlap", gain=(0.4, 0.3), run="147"),
    Claim("PCA noise", "pca_noise", False, "no-pca", gain=(1.0, None), words="'over 1%' top-1"),
    Claim("dropout", "dropout", False, "no-dropout", words="'substantial overfitting' without it"),
)


def claim_of(diff: dict) -> Claim | None:
    """The paper's claim an ablation's config differences test, or None."""
    return next((c for c in CLAIMS if c.key in diff and diff[c.key] == c.value), None)


def original_difference(change) -> tuple | None:
    """(top-1, top-5, 'run − run') of the original runs for a config change, or None."""
    c = next((c for c in CLAIMS if c.change == change), None)
    return c.original_difference() if c else None


# The verdict on a claim from the paired interval [low, high] of n seeds; each rule once, and the
# report's legend is written from this list.
VERDICTS = (
    ("no number claimed", "the paper gives none"),
    ("one seed: no interval", "n = 1"),
    ("not distinguishable from seed noise", "the interval contains 0"),
    ("reproduced", "it excludes 0 on the claimed side and contains the claimed difference, or lies above it"),
    ("smaller than claimed", "it excludes 0 but lies below the claim"),
    ("reversed: the ablation is better", "it excludes 0 on the other side"),
)


def _run_summary(run: Path) -> dict:
    import json

    import yaml

    from .config import load_config
    from .inference import read_eval
    from .runs import read_metrics

    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    defaults = load_config(None, {}).to_dict()
    diff = {k: v for k, v in cfg.items() if k in defaults and v != defaults[k] and k not in ("data", "val_data")}
    ev = read_eval(run)  # the paper's way of measuring when the run has it
    imported = json.loads((run / "import.json").read_text()) if (run / "import.json").exists() else None
    started = json.loads((run / "init_from.json").read_text()) if (run / "init_from.json").exists() else None
    return dict(run=run, name=run.name, metrics=read_metrics(run), config=cfg, diff=diff, eval=ev, imported=imported,
                init_from=started)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _pair(d) -> str:
    """top-1 / top-5 in %, n/a where top-5 is undefined (≤ 5 classes)."""
    return f"{_pct(d['top1_err'])} / {_pct(d['top5_err'])}"


def _network(ev: dict) -> str:
    if ev.get("imported"):
        return "imported"
    kind = {"last": "final", "best": "best-on-val", "file": "file"}.get(ev.get("network"), "?")
    return f"{kind}, epoch {ev.get('epoch')}"


def _basis(ev: dict, views: int):
    """What a figure is comparable on: views, checkpoint rule, split, images, data."""
    if not ev or f"{views}-view" not in ev:
        return None
    return (views, ev.get("network"), ev.get("split", "val"), ev[f"{views}-view"]["images"], ev.get("data"))


def _last_epoch(s: dict) -> str:
    m = [r for r in s["metrics"] if "val_top1_err" in r]
    if not m:
        return "—"
    r = m[-1]
    n = f", {r['val_images']:,} images" if r.get("val_images") is not None else ""
    return f"{_pct(r['val_top1_err'])} / {_pct(r.get('val_top5_err'))} (epoch {r['epoch']}{n})"


# -- runs grouped by config, across seeds ------------------------------------------------------

def _seed(s: dict) -> int:
    return int(s["config"].get("seed", 0) or 0)


def group_runs(summaries) -> list[dict]:
    """Runs grouped by their config less its seed (and less what does not change the result), in
    the order each config first appears. Each group: name, diff, runs (by seed)."""
    groups: dict = {}
    for s in summaries:
        key = tuple(sorted((k, repr(v)) for k, v in s["config"].items() if k not in NOT_THE_EXPERIMENT))
        groups.setdefault(key, []).append(s)
    out = []
    for runs in groups.values():
        runs = sorted(runs, key=_seed)
        stems = {re.sub(r"-seed\d+$", "", s["name"]) for s in runs}
        diff = {k: v for k, v in runs[0]["diff"].items() if k not in NOT_THE_EXPERIMENT}
        name = stems.pop() if len(stems) == 1 else (", ".join(f"{k}={v}" for k, v in diff.items()) or "as-run")
        cfg = {k: v for k, v in runs[0]["config"].items() if k not in NOT_THE_EXPERIMENT}
        out.append(dict(name=name, diff=diff, runs=runs, cfg=cfg))
    return out


def recipe_departures(cfg: dict, recipe: str) -> list[str]:
    """The keys that ``configs/<recipe>.yaml`` sets (the recipe: a schedule, say) in which ``cfg``
    departs from it; the length of training (``epochs``) and how a run ran are the user's."""
    import yaml

    from .config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"{recipe}.yaml"
    if not path.exists():
        return []
    keys = set(yaml.safe_load(path.read_text()) or {}) - NOT_THE_EXPERIMENT - {"epochs", "data", "val_data"}
    want = load_config(path).to_dict()
    return [k for k in sorted(keys) if cfg.get(k) != want[k]]


def baseline_of(g: dict, groups: list) -> dict | None:
    """The group an ablation is paired with: for one of the paper's claims, the group whose config
    is this one's with the claim's switch back at its default (the claim's own baseline recipe,
    whichever that is: run 145's, or run 145-2010's for two GPUs); otherwise, or where there is
    none, the first group (the report's first run)."""
    from .config import load_config

    c = claim_of(g["diff"])
    if c is not None:
        want = dict(g["cfg"], **{c.key: load_config(None, {}).to_dict()[c.key]})
        found = next((b for b in groups if b is not g and b["cfg"] == want), None)
        if found is not None:
            return found
    return groups[0] if groups[0] is not g else None


def mean_sd(values) -> tuple:
    """(mean, sample standard deviation or None with one value, n)."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, sd, len(v)


def t_interval(diffs, level: float = 0.95) -> tuple:
    """(mean, low, high, n): Student's t interval of the mean, n − 1 degrees of freedom; low and
    high are None with one value."""
    from scipy.special import stdtrit  # t's quantile (scipy.stats would cost ~1 s more to import)

    m, sd, n = mean_sd(diffs)
    if n < 2:
        return m, None, None, n
    half = float(stdtrit(n - 1, 0.5 + level / 2)) * sd / math.sqrt(n)
    return m, m - half, m + half, n


def seeds_needed(sd: float | None, claim: float | None, level: float = 0.95, most: int = 1000) -> int | None:
    """The fewest seeds n at which the paired interval's half-width, t(n − 1)·sd/√n at the spread
    ``sd`` seen so far, is below the claimed difference: from then on a difference of the paper's
    size lies outside seed noise. None where there is no claim or no spread; ``most`` + 1 when
    even ``most`` seeds would not do."""
    from scipy.special import stdtrit

    if claim is None or sd is None or claim <= 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, most + 1):
        if float(stdtrit(n - 1, 0.5 + level / 2)) * sd / math.sqrt(n) < claim:
            return n
    return most + 1


def verdict(n: int, low, high, claim) -> str:
    """The paper's claim (the baseline better by ``claim``, in the interval's units) against the
    paired interval [low, high] of n seeds: one of :data:`VERDICTS`, tried in their order."""
    if claim is None:
        return VERDICTS[0][0]
    if n < 2:
        return VERDICTS[1][0]
    if low <= 0 <= high:
        return VERDICTS[2][0]
    if low > 0:
        return VERDICTS[3][0] if high >= claim else VERDICTS[4][0]
    return VERDICTS[5][0]


def verdict_legend() -> str:
    return "Verdicts: " + "; ".join(f"*{name}*: {rule}" for name, rule in VERDICTS) + "."


def _fmt_ms(m, sd, n) -> str:
    if m is None:
        return "—"
    return f"{100 * m:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")


def _views_of(group) -> int:
    return 10 if all("10-view" in s["eval"] for s in group["runs"] if s["eval"]) else 1


def _config_table(groups) -> list[str]:
    lines = ["## Each config across seeds (error %, mean ± sample standard deviation over seeds)", "",
             "| config | n | seeds | ten views top-1 | ten views top-5 | one view top-1 | one view top-5 |",
             "|---|---|---|---|---|---|---|"]
    for g in groups:
        evals = [s["eval"] for s in g["runs"] if s["eval"]]
        cells = []
        for v in ("10-view", "1-view"):
            for m in ("top1_err", "top5_err"):
                cells.append(_fmt_ms(*mean_sd([e[v][m] for e in evals if v in e])))
        seeds = ", ".join(str(_seed(s)) for s in g["runs"] if s["eval"]) or "—"
        lines.append(f"| {g['name']} | {len(evals)} | {seeds} | " + " | ".join(cells) + " |")
    missing = [s for g in groups for s in g["runs"] if not s["eval"]]
    if missing:
        lines += ["", "Left out, not evaluated: " + ", ".join(f"`replica eval {s['run']}`" for s in missing)]
    return lines


def paired(base: dict, group: dict, views: int) -> dict:
    """Per seed, the ablation's error minus the baseline's of the same seed (both measured alike),
    and the seeds left out with the reason."""
    by_seed = {_seed(s): s for s in base["runs"]}
    diffs, left_out = {}, []
    for s in group["runs"]:
        seed = _seed(s)
        b = by_seed.get(seed)
        if b is None:
            left_out.append((seed, "no baseline run with this seed"))
            continue
        if not s["eval"] or not b["eval"]:
            left_out.append((seed, "not evaluated" if not s["eval"] else "its baseline is not evaluated"))
            continue
        mine, theirs = _basis(s["eval"], views), _basis(b["eval"], views)
        if mine is None or mine != theirs:
            why = f"no {views}-view figure" if mine is None or theirs is None else ", ".join(
                n for n, x, y in zip(("views", "network", "split", "images", "data"), mine, theirs) if x != y) + " differ"
            left_out.append((seed, f"not comparable ({why})"))
            continue
        e, eb = s["eval"][f"{views}-view"], b["eval"][f"{views}-view"]
        d5 = None if e["top5_err"] is None or eb["top5_err"] is None else e["top5_err"] - eb["top5_err"]
        diffs[seed] = (e["top1_err"] - eb["top1_err"], d5)
    return dict(diffs=diffs, left_out=left_out)


def _interval_text(m, lo, hi) -> str:
    if m is None:
        return "n/a"
    return f"{100 * m:+.2f}" + (f" [{100 * lo:+.2f}, {100 * hi:+.2f}]" if lo is not None else "")


def _ablation_table(groups) -> list[str]:
    pairs = [(g, baseline_of(g, groups)) for g in groups[1:]]
    bases = {id(b) for g, b in pairs if claim_of(g["diff"]) is not None}
    pairs = [(g, b) for g, b in pairs if b is not None and id(g) not in bases]  # a claim's baseline is no row
    lines = ["", "## Ablations, each paired by seed with its baseline", "",
             "Each difference is the ablation's error minus its baseline's of the same seed, in points: positive "
             "means the baseline is better. Mean over seeds and its 95% confidence interval (Student's t, n − 1 "
             "degrees of freedom). Each ablation is paired with the config that differs from it only in the claim's "
             "switch (its own baseline recipe: run 145's, or run 145-2010's for two GPUs), else with the first "
             "config; the last column names it, and says where it is not the claim's recipe.", "",
             "| ablation | n | top-1 diff [95% CI] | top-5 diff [95% CI] | the paper's claim | original runs | "
             "verdict top-1; top-5 | paired with |", "|---|---|---|---|---|---|---|---|"]
    notes, per_seed, needed = [], [], []
    for g, base in pairs:
        views = _views_of(base)
        claim = claim_of(g["diff"])
        p = paired(base, g, views)
        d1 = t_interval([d[0] for d in p["diffs"].values()])
        d5 = t_interval([d[1] for d in p["diffs"].values() if d[1] is not None])
        c1, c5 = claim.gain if claim else (None, None)
        claim_text = f"{claim.name}: {c1 if c1 is not None else '?'} / {c5 if c5 is not None else '?'}" if claim else "—"
        orig = claim.original_difference() if claim else None
        orig_text = f"{orig[0]:.2f} / {orig[1]:.2f} ({orig[2]})" if orig else "—"
        if not p["diffs"]:
            v_text = "no pair of comparable runs"
        elif claim is None:
            v_text = "not one of the paper's claims"
        else:
            pts = lambda c: None if c is None else c / 100  # noqa: E731  (claims are in points, errors fractions)
            v1 = verdict(d1[3], d1[1], d1[2], pts(c1))
            v5 = verdict(d5[3], d5[1], d5[2], pts(c5)) if d5[3] else "n/a"
            v_text = f"{v1} (n={d1[3]}); {v5}"
        off = recipe_departures(base["cfg"], claim.baseline) if claim else []
        own = f" (not the claim's recipe, configs/{claim.baseline}.yaml of run {claim.baseline_run}: " \
              f"{', '.join(off)} differ)" if off else ""
        lines.append(f"| {g['name']} | {d1[3]} | {_interval_text(*d1[:3])} | {_interval_text(*d5[:3])} | "
                     f"{claim_text} | {orig_text} | {v_text} | {base['name']}, {'ten views' if views == 10 else 'one view'}"
                     f"{own} |")
        if claim and d1[3] >= 2:
            sds = (mean_sd([d[0] for d in p["diffs"].values()])[1],
                   mean_sd([d[1] for d in p["diffs"].values() if d[1] is not None])[1])
            cells = [f"{which} {'>1000' if n > 1000 else n}" for which, sd, c in zip(("top-1", "top-5"), sds, (c1, c5))
                     if (n := seeds_needed(sd, None if c is None else c / 100)) is not None]
            if cells:
                needed.append(f"- {g['name']}: seeds needed: " + ", ".join(cells) + f" (n = {d1[3]} so far)")
        if p["diffs"]:
            per_seed.append(f"- {g['name']}: " + ", ".join(
                f"seed {k} {100 * a:+.2f} / {'n/a' if b is None else f'{100 * b:+.2f}'}"
                for k, (a, b) in sorted(p["diffs"].items())))
        notes += [f"- {g['name']}, seed {seed}: left out, {why}" for seed, why in p["left_out"]]
    lines += ["", "Per seed (top-1 / top-5 difference):", ""] + per_seed if per_seed else []
    if needed:
        lines += ["", "How many seeds a claim needs: the fewest n at which the paired 95% interval's half-width, "
                      "t(n − 1)·sd/√n at the spread seen here, is below the paper's difference, so that a difference "
                      "of that size lies outside seed noise:", ""] + needed
    if notes:
        lines += ["", "Not paired:", ""] + notes
    lines += ["", verdict_legend()]
    return lines


def _fig3_table(groups) -> list[str]:
    lines = ["", f"## Fig. 3 across seeds (the towers separate when their median conv1 colour specificities "
                 f"differ by ≥ {SEPARATION}; last epoch)", "",
             "| config | runs | separated | colour-specific tower, per seed |", "|---|---|---|---|"]
    for g in groups:
        if g["diff"].get("variant") == "one-gpu-half":
            continue
        cells, sep, n = [], 0, 0
        for s in g["runs"]:
            cs = next((r.get("colour_specificity") for r in reversed(s["metrics"]) if r.get("colour_specificity")),
                      None)
            if not cs or "a" not in cs or "b" not in cs:
                continue
            n += 1
            d = cs["b"] - cs["a"]
            if abs(d) >= SEPARATION:
                sep += 1
                cells.append(f"seed {_seed(s)}: {'b' if d > 0 else 'a'} ({cs['a']:.2f} / {cs['b']:.2f})")
            else:
                cells.append(f"seed {_seed(s)}: none ({cs['a']:.2f} / {cs['b']:.2f})")
        if n:
            lines.append(f"| {g['name']} | {n} | {sep} of {n} | {'; '.join(cells)} |")
    return lines if len(lines) > 4 else []


def report(runs, out=None) -> Path:
    """Markdown + PNG: runs grouped by config across seeds, ablations paired by seed with
    intervals and a verdict for each of the paper's claims, Fig. 3 across seeds, each run's
    figures, and the paper's numbers.

    Final figures come from each run's eval.json (``replica eval``), with the network, views and
    images they were measured on; the last epoch's validation error (one view, possibly a
    ``val_batches`` sample) is shown apart, never in their place. Ablations pair only figures
    measured alike: the same views, checkpoint rule, split, images and data as the baseline's
    of the same seed. The first run's config is the baseline.
    """
    summaries = [_run_summary(Path(r)) for r in runs]
    names = [s["name"] for s in summaries]
    for s in summaries:
        if names.count(s["name"]) > 1:  # runs/a/run and runs/b/run: name them by their parent too
            s["name"] = f"{s['run'].parent.name}/{s['name']}"
    for s in summaries:
        if not s["metrics"] and not s["eval"]:
            raise ReplicaError(f"{s['run']}: no metrics.jsonl or eval.json: not a finished run folder")
    out = Path(out) if out else summaries[0]["run"]
    out.mkdir(parents=True, exist_ok=True)
    ensembles = [s for s in summaries if s["eval"].get("ensemble")]
    summaries = [s for s in summaries if not s["eval"].get("ensemble")] or summaries[:0]
    if not summaries:
        raise ReplicaError("only ensembles given: give their member runs too (the report reads runs; an ensemble's "
                           "eval.json is shown beside them)")
    groups = group_runs(summaries)
    plot_curves(groups, out / "curves.png")
    lines = ["# replica report", "", "![learning curves and conv1 colour specificity, mean over seeds](curves.png)",
             ""]
    lines += _config_table(groups)
    if len(groups) > 1:
        lines += _ablation_table(groups)
    lines += _fig3_table(groups)
    lines += ["", "## Each run (top-1 / top-5 error, %, from `replica eval`)", "",
              "| run | one view | ten views | network | images | last epoch's validation (one view) |",
              "|---|---|---|---|---|---|"]
    for s in summaries:
        ev = s["eval"]
        one, ten = ev.get("1-view"), ev.get("10-view")
        if ev:
            first = one or ten
            images = f"{first['images']:,} {ev.get('images_of', 'images')}"
            lines.append(f"| {s['name']} | {_pair(one) if one else '—'} | {_pair(ten) if ten else '—'} | "
                         f"{_network(ev)} | {images} | {_last_epoch(s)} |")
        else:
            lines.append(f"| {s['name']} | not evaluated | not evaluated | — | — | {_last_epoch(s)} |")
    if any((s["eval"].get(k) or {}).get("top5_err", 0) is None for s in summaries for k in ("1-view", "10-view")):
        lines += ["", "top-5 is n/a with 5 classes or fewer: every label is then in the top 5."]
    lines += ["", "How each figure was measured:", ""]
    from .inference import describe_eval

    for s in summaries:
        lines.append(f"- {s['name']}: {describe_eval(s['eval']) if s['eval'] else 'no eval.json'}")
    lines += ["", "## Differences from the as-run preset", ""]
    for g in groups:
        d = ", ".join(f"`{k}={v}`" for k, v in g["diff"].items()) or "none"
        lines.append(f"- {g['name']} ({len(g['runs'])} run{'s' if len(g['runs']) > 1 else ''}): {d}")
    lines += _started_from(summaries)
    lines += _imported_table(summaries)
    lines += _ensemble_table(ensembles)
    lines += _paper_table(summaries)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _started_from(summaries) -> list[str]:
    """Runs that started from another run's weights (``init_from``): the source and what was taken."""
    started = [s for s in summaries if s.get("init_from")]
    if not started:
        return []
    lines = ["", "## Started from another run's weights", ""]
    for s in started:
        r = s["init_from"]
        layers = r.get("layers", [])
        lines.append(f"- {s['name']}: {r.get('checkpoint', '?')} (sha1 {str(r.get('sha1', '?'))[:12]}), "
                     f"init_layers={r.get('init_layers', '?')}: {len(layers)} layers taken, the rest drawn anew")
    return lines


# Table 2: "5 CNNs", the average of five nets' predictions, ILSVRC-2012 val, top-1 / top-5 (%)
PAPER_ENSEMBLE = (5, 38.1, 16.4)


def _ensemble_table(ensembles) -> list[str]:
    """Each ensemble (``replica eval RUN… --out``) beside its members' mean, and beside the
    paper's "5 CNNs" only where it was measured on ILSVRC-2012's validation images."""
    if not ensembles:
        return []
    lines = ["", "## Ensembles (Table 2's 'k CNNs': the members' probabilities averaged; top-1 / top-5 error, %)", "",
             "| ensemble | k | ten views | one view | the members' mean, ten views | the paper |", "|---|---|---|---|---|---|"]
    for s in ensembles:
        ev = s["eval"]
        ten = [m["10-view"] for m in ev["members"] if "10-view" in m]
        mean = "—" if not ten else (f"{_fmt_ms(*mean_sd([t['top1_err'] for t in ten]))} / "
                                    f"{_fmt_ms(*mean_sd([t['top5_err'] for t in ten]))}")
        k, p1, p5 = PAPER_ENSEMBLE
        paper = f"{k} CNNs: {p1} / {p5}" if ev.get("dataset") == "ilsvrc2012" and ev.get("split") == "val" else "—"
        lines.append(f"| {s['name']} | {ev['ensemble']} | {_pair(ev['10-view']) if '10-view' in ev else '—'} | "
                     f"{_pair(ev['1-view']) if '1-view' in ev else '—'} | {mean} | {paper} |")
    lines += ["", "Members: " + "; ".join(f"{s['name']}: " + ", ".join(Path(m["run"]).name for m in s["eval"]["members"])
                                          for s in ensembles)]
    if any(s["eval"].get("weights") for s in ensembles):
        lines += ["", "Weighted ensembles (--weights): coefficients chosen on the same images would flatter the "
                      "figure; say where they came from."]
    return lines


def _paper_table(summaries) -> list[str]:
    """The original runs and the paper's figures (docs/spec.md §5) for the datasets these runs were
    evaluated on, and only those: each baseline run, then each claim with its pair of runs."""
    present = [d for d in DATASETS if any(s["eval"].get("dataset") == d for s in summaries)]
    if not present:
        return ["", "## The paper and the original run", "",
                "Not shown: no run here was evaluated on ILSVRC-2012 or ILSVRC-2010 (eval.json names no such "
                "dataset), so their figures would not compare. `replica prepare` records the dataset when it "
                "reads ImageNet's archives or the Kaggle layout with all 1,000 classes."]
    lines = ["", f"## The paper and the original run (docs/spec.md §5, {' and '.join(DATASETS[d] for d in present)}, "
                 f"ten views)", "", "| config | original run log | paper |", "|---|---|---|"]
    for r in ORIGINAL.values():
        if r.paper and r.dataset in present:
            lines.append(f"| baseline, run {r.name} ({DATASETS[r.dataset]}) | {r.top1:.2f} / {r.top5:.2f}"
                         f"{'; ' + r.also if r.also else ''} | {r.paper} |")
    for c in CLAIMS:
        base = ORIGINAL[c.baseline_run]
        if base.dataset not in present:
            continue
        run = ORIGINAL.get(c.run)
        what = f"{c.config}, run {run.name} ({DATASETS[run.dataset]})" if run else c.config
        log = f"{run.top1:.2f} / {run.top5:.2f}" if run else "—"
        lines.append(f"| {what} | {log} | {c.paper_text()} |")
    return lines


def bvlc_on_its_data(s: dict) -> bool:
    """Whether a run's imported weights are the BVLC release (its sha1) and its eval was on
    ILSVRC-2012's validation set (all 1000 classes, 50,000 images): only then do BVLC's
    published figures describe what was measured."""
    ev, one = s["eval"], s["eval"].get("1-view") or {}
    return bool(s["imported"] and s["imported"].get("matches_bvlc") and ev.get("split", "val") == "val"
                and ev.get("classes") == 1000 and ev.get("classes_evaluated", "all") == "all"
                and one.get("images", 0) + one.get("skipped", 0) == 50_000)


def _imported_table(summaries) -> list[str]:
    """Imported weights (``replica import``) beside the figures their makers published."""
    from .weights import BVLC_BAND, BVLC_PUBLISHED

    rows = [s for s in summaries if s["imported"]]
    if not rows:
        return []
    pub = BVLC_PUBLISHED
    lines = ["", "## Imported weights beside their published figures (top-1 / top-5 error, %)", "",
             "| run | imported from | one view here | BVLC published (one centre crop, ILSVRC-2012 val) | "
             "expected band here |", "|---|---|---|---|---|"]
    band = f"{BVLC_BAND['top1_err'][0]:.1f}–{BVLC_BAND['top1_err'][1]:.1f} / " \
           f"{BVLC_BAND['top5_err'][0]:.1f}–{BVLC_BAND['top5_err'][1]:.1f}"
    unlike = 0
    for s in rows:
        one = s["eval"].get("1-view")
        if bvlc_on_its_data(s):
            published = f"{_pct(pub['top1_err'])} / {_pct(pub['top5_err'])} | {band}"
        else:
            published, unlike = "— | —", unlike + 1
        lines.append(f"| {s['name']} | {Path(s['imported'].get('file', '?')).name} | {_pair(one) if one else '—'} | "
                     f"{published} |")
    lines += ["", "The band, not the published figure exactly: replica resizes by the shorter side and decodes with "
                  "PIL, Caffe's ILSVRC-2012 images were warped to 256 × 256 and decoded with OpenCV (docs/analysis.md)."]
    if unlike:
        lines += ["", "—: the published figures are shown only for the BVLC release itself (its sha1) measured on all "
                      "50,000 ILSVRC-2012 validation images; another file, or other data, has no published figure "
                      "to stand beside."]
    return lines
