"""DeepCore's core points: inputs a source model classifies with high confidence, far from its boundary.

Each point starts from a random draw of the source's input domain (Gaussian with the seeds' per-feature
statistics; for token models, windows of seed text, text the model writes itself, or random tokens) and
gets a target label the source did not give it, spread over all classes; it then moves until the source
gives that label with `confidence`: by signed-gradient steps for continuous inputs, by a greedy search over
single-token substitutions for token inputs (which have no gradient). The `boundary` variant moves points
to where the source's top two labels tie instead (DeepCore's contrast).

`conferrable_points` shapes the probe with models the owner holds (Lukas et al., "Deep Neural Network
Fingerprinting by Conferrable Adversarial Examples", ICLR 2021): points the source and its surrogates
(copies the owner distilled itself, `pipeline.verify.surrogates`) give a label with confidence, and its
homolog references (trained apart) do not. Copies inherit such points; homologs, like the references,
mostly do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

from pipeline.errors import VerifyError
from pipeline.verify.runnable import InputDomain, RunnableModel
from pipeline.verify.workers import Workers

__all__ = [
    "CORE_CONFIDENCE",
    "CORE_STEP",
    "CONFERRABLE_POINTS",
    "CONFERRABLE_STEPS",
    "CorePoints",
    "conferrable_points",
    "conferrable_size",
    "core_points",
    "input_spread",
    "require_labels",
    "token_pool",
]

# The probe: core points per source, search steps at most, the source's confidence in each point's label.
CORE_POINTS = 200
CORE_STEPS = 100
CORE_CONFIDENCE = 0.9
CORE_STEP = 0.02  # continuous inputs: a step is this fraction of each feature's spread
# Token inputs have no gradient: a greedy search tries this many single-token substitutions per sequence
# and step, for at most TOKEN_STEPS steps (a forward pass per candidate: kept small for CPU).
TOKEN_CANDIDATES = 8
TOKEN_STEPS = 20
TOKEN_POINTS = 100
# Conferrable points: the search starts from CONFERRABLE_POOL x n starts, goes on with the m x n most
# conferrable after each (fraction of CONFERRABLE_STEPS, m) of CONFERRABLE_HALVE, and keeps the n most
# conferrable at the end; AVOID weighs the references' -log(1 - p(target)) against the source's and
# surrogates' cross-entropy (bench/verify.py: 3 gave the best AUC of 1 and 3 on the zoo).
# On the verify zoo (`agreement` AUC, copies vs homologs, with the same surrogates; a CNN's search of 200
# points in seconds, 1 CPU thread): all 4n starts for 100 steps 0.954 (80 s); the best n after 25 steps 0.960 (30 s);
# the best 2n after 25 steps 0.960 (59 s); the best 2n after 10 steps and n after 25, 0.953 (27 s); 2n
# starts, the best n after 25 steps 0.957 (25 s); n starts alone 0.934 (21 s). Fewer, longer steps over
# the same reach cost more: 4n starts for 25 steps of 4 x CORE_STEP 0.937 (25 s), 50 of 2 x 0.939 (37 s).
# Points (continuous inputs): 100 against DeepCore's 200 halve the search for the same AUC (0.9645 against
# 0.9605, FIR 1/207 homologs either way; 64 points 0.960; pool 3, 0.958; halving after 15% of the steps,
# 0.957): conferrable points are chosen ones, and the prior-corrected agreement on 100 of them moves in
# steps of 0.01, fine against the 0.75 cut. Search steps matter more than points: 100 points, 2
# surrogates and 50 steps gave 0.914 (100 steps: 0.957).
# Cheaper settings on the rebuilt zoo, each a fifth to a third less work (`python -m bench.verify --probes
# conferrable-real`; these settings 0.9520 from probe seed 0, 0.9523 from seed 1): 64 points 0.9432; pool 2,
# 0.9499; pool 2 with 150 surrogate steps 0.9529 from seed 0 but 0.9384 from seed 1 (one draw's luck, not a
# free quarter); the same halving after 15% of the steps 0.9461, or with 85 steps 0.9445. AVOID 4 (the same
# work): 0.9543 / 0.9577 from seeds 0 / 1 and no homolog called pirated, but more copies missed at the 0.75
# cut (26 and 23 of 81 against 24 and 22): no clear gain, so 3 stays.
CONFERRABLE_POINTS = 100
CONFERRABLE_STEPS = 100
CONFERRABLE_POOL = 4
CONFERRABLE_HALVE: tuple[tuple[float, int], ...] = ((0.25, 1),)
AVOID = 3.0


@dataclass(frozen=True)
class CorePoints:
    """Inputs on which the source is confident (`core`) or undecided (`boundary`), with its labels."""

    inputs: torch.Tensor  # (n, *shape): float for continuous inputs, int64 token ids for token models
    labels: torch.Tensor  # (n,) the source's label on each point
    confidence: torch.Tensor  # (n,) the source's probability of that label
    variant: str
    seconds: float


def core_points(
    source: RunnableModel,
    *,
    seeds: torch.Tensor | np.ndarray | None = None,
    n: int | None = None,
    steps: int | None = None,
    variant: str = "core",
    seed: int = 0,
    confidence: float = CORE_CONFIDENCE,
    step: float = CORE_STEP,
) -> CorePoints:
    """Inputs the source classifies with `confidence` in a label it did not give the start (DeepCore's
    core points), or inputs on its decision boundary (`variant="boundary"`, for contrast).

    Start points are random draws of the input domain: for continuous inputs, Gaussian with the seeds'
    per-feature mean and standard deviation (`seeds`: real inputs, (N, *shape)), else with mean 0 and
    the domain's scale; for token inputs, windows of the seed text (a 1-D token stream or (N, L) ids),
    else text a language model writes itself (sampled from it), or uniform random tokens for a sequence
    classifier. Each start gets a target label, spread round-robin over the classes and
    different from the source's label on it; the search then moves it until the source gives the target
    `confidence` (DeepCore: confidence grows with the distance from the boundary). `n` and `steps` default
    to CORE_POINTS and CORE_STEPS for continuous inputs, TOKEN_POINTS and TOKEN_STEPS for tokens.

    Why random starts and a fixed confidence rather than real inputs pushed to saturation: on the zoo,
    points deep in a class (saturated confidence) are labelled alike by every model trained on the same
    data, homologs included; points the source was led to, at a set confidence, are where copies of it
    follow and homologs do not, and a set confidence puts them at comparable depth for every architecture.

    Continuous inputs take signed-gradient steps of `step` x the per-feature spread, each point stopping
    when it reaches `confidence`, within 4 spreads of the mean. Token ids have no gradient: each step
    tries TOKEN_CANDIDATES random single-token substitutions per sequence and keeps the best, a greedy
    search that never lowers the objective. A language model (more outputs than points) targets each
    sequence's second most likely next token. `boundary`: the target's logit is driven to the runner-up's
    (margin 0), the near-boundary points IPGuard-style fingerprints use. Deterministic from `seed`.

    Raises:
        VerifyError: the source fails on its inputs or outputs NaN, or its outputs are not labels.
        ValueError: a bad argument (variant, n, steps, confidence).
    """
    if variant not in ("core", "boundary"):
        raise ValueError(f"variant must be 'core' or 'boundary', not {variant!r}")
    continuous = source.domain.kind == "continuous"
    n = n if n is not None else CORE_POINTS if continuous else TOKEN_POINTS
    steps = steps if steps is not None else CORE_STEPS if continuous else TOKEN_STEPS
    if n < 1 or steps < 0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need n >= 1, steps >= 0, 0 < confidence < 1 (got {n}, {steps}, {confidence})")
    start_time = time.perf_counter()
    require_labels(source)
    gen = torch.Generator().manual_seed(seed)
    domain = source.domain
    if domain.kind == "continuous":
        mean, spread = input_spread(domain, seeds)
        pool = mean + spread * torch.randn((max(4 * n, 64), *domain.shape), generator=gen)
        starts, targets = _targets(source, pool, n, gen)
        low = mean - 4 * spread if domain.low is None else torch.full(domain.shape, domain.low)
        high = mean + 4 * spread if domain.high is None else torch.full(domain.shape, domain.high)
        x = _ascend(source, starts, targets, _objective_of(source, variant), _done_at(variant, confidence),
                    steps=steps, step=step * spread, low=low, high=high)
    else:
        language_model = source.n_outputs == domain.vocab  # no classes to spread: n starts are enough
        pool = token_pool(source, seeds, n if language_model else max(4 * n, 64), gen)
        starts, targets = _targets(source, pool, n, gen)
        x = _mutate(source, starts, targets, _objective_of(source, variant), _done_at(variant, confidence),
                    steps=steps, gen=gen)
    probs = source.probs(x)
    labels = probs.argmax(dim=1)
    return CorePoints(
        inputs=x, labels=labels, confidence=probs.gather(1, labels[:, None])[:, 0], variant=variant,
        seconds=time.perf_counter() - start_time,
    )


def input_spread(domain: InputDomain, seeds: torch.Tensor | np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation of the inputs: the seeds', or (0, scale)."""
    if seeds is None:
        return torch.zeros(domain.shape), torch.full(domain.shape, float(domain.scale))
    data = torch.as_tensor(np.asarray(seeds)).float()
    if data.dim() < 1 or len(data) < 2 or data[0].numel() != int(np.prod(domain.shape)):
        raise VerifyError(f"seeds of shape {tuple(data.shape)} do not fit the model's inputs {domain.shape}")
    data = data.reshape(len(data), *domain.shape)
    if not torch.isfinite(data).all():
        raise VerifyError("seeds hold NaN or infinite values")
    return data.mean(dim=0), data.std(dim=0)


def token_pool(source: RunnableModel, seeds: torch.Tensor | np.ndarray | None, size: int,
                gen: torch.Generator) -> torch.Tensor:
    """Start sequences: windows of the seed tokens; else text the model writes itself (a language model:
    random tokens are far from anything it was trained on, and it is not confident there); else uniform
    random tokens."""
    domain = source.domain
    length = domain.shape[0]
    if seeds is None:
        if source.outputs == "labels" and source.n_outputs == domain.vocab:
            return _generate(source, size, length, gen)
        return torch.randint(0, domain.vocab, (size, length), generator=gen)
    data = torch.as_tensor(np.asarray(seeds)).long()
    if data.dim() == 1:
        if len(data) < length:
            raise VerifyError(f"seed text has {len(data)} tokens, fewer than the probe's {length}")
        offsets = torch.randint(0, len(data) - length + 1, (size,), generator=gen)
        data = torch.stack([data[o: o + length] for o in offsets.tolist()])
    elif data.dim() != 2 or data.shape[1] < length or len(data) == 0:
        raise VerifyError(f"token seeds must be a stream or (N, >= {length}) ids, got {tuple(data.shape)}")
    else:
        data = data[torch.randint(0, len(data), (size,), generator=gen), :length]
    if int(data.min()) < 0 or int(data.max()) >= domain.vocab:
        raise VerifyError(f"seed token ids outside the vocabulary [0, {domain.vocab})")
    return data


def _generate(source: RunnableModel, size: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """`size` sequences sampled from a language model (temperature 1), each from a random first token."""
    x = torch.randint(0, source.domain.vocab, (size, 1), generator=gen)
    for _ in range(length - 1):
        probs = source.probs(x).cpu().double()
        x = torch.cat([x, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return x


def _targets(source: RunnableModel, pool: torch.Tensor, n: int, gen: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """n starts and their target labels: spread round-robin over the classes, each start one the
    source gives another label (a language model: each sequence's runner-up token)."""
    logits = source.logits(pool).cpu()
    predicted = logits.argmax(dim=1)
    classes = source.n_outputs
    if classes > n:  # a vocabulary, not classes to spread over
        return pool[:n], logits[:n].topk(2, dim=1).indices[:, 1]
    used = torch.zeros(len(pool), dtype=torch.bool)
    picks, targets = [], []
    for i in range(n):
        c = i % classes
        free = (~used & (predicted != c)).nonzero()
        if len(free) == 0:
            free = (~used).nonzero()
        j = int(free[0])
        used[j] = True
        picks.append(j)
        targets.append(c)
    return pool[picks], torch.tensor(targets)


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, targets) -> per-point loss
Done = Callable[[torch.Tensor], torch.Tensor]  # per-point loss -> the points whose search is over
Progress = Callable[[int], object]  # called with the steps done since its last call (a progress bar's update)


def _objective(logits: torch.Tensor, targets: torch.Tensor, variant: str) -> torch.Tensor:
    """Per-point loss to minimise: -log p(target) (core) or the squared margin to the runner-up."""
    if variant == "core":
        return F.cross_entropy(logits, targets, reduction="none")
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values
    return (target_logit - others) ** 2


def _objective_of(source: RunnableModel, variant: str) -> Loss:
    return lambda x, targets: _objective(source.forward(x), targets, variant)


def _done_at(variant: str, confidence: float) -> Done:
    """Points whose search is over: confident enough (core), or on the boundary (margin under 0.01)."""
    if variant == "core":
        return lambda loss: loss <= -np.log(confidence)
    return lambda loss: loss <= 1e-4


def _ascend(source: RunnableModel, starts: torch.Tensor, targets: torch.Tensor, objective: Loss, done: Done, *,
            steps: int, step: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    device = source.device
    x = starts.to(device).clone().requires_grad_(True)
    targets, step, low, high = targets.to(device), step.to(device), low.to(device), high.to(device)
    shape = (-1, *([1] * (x.dim() - 1)))
    for _ in range(steps):
        loss = objective(x, targets)
        if not torch.isfinite(loss).all():
            raise VerifyError(f"{source.name}: non-finite outputs while searching core points")
        active = ~done(loss.detach())
        if not active.any():
            break
        (grad,) = torch.autograd.grad(loss.sum(), x)
        with torch.no_grad():
            x -= step * grad.sign() * active.reshape(shape)
            x.copy_(torch.maximum(torch.minimum(x, high), low))
    return x.detach()


def _mutate(source: RunnableModel, starts: torch.Tensor, targets: torch.Tensor, objective: Loss, done: Done, *,
            steps: int, gen: torch.Generator, progress: Progress | None = None) -> torch.Tensor:
    n, length = starts.shape
    k = TOKEN_CANDIDATES
    x = starts.clone()
    with torch.no_grad():
        best = objective(x, targets).cpu()
        for _ in range(steps):
            active = (~done(best)).nonzero()[:, 0]
            if len(active) == 0:
                break
            m = len(active)
            cands = x[active].repeat_interleave(k, dim=0)
            cands[torch.arange(m * k), torch.randint(0, length, (m * k,), generator=gen)] = torch.randint(
                0, source.domain.vocab, (m * k,), generator=gen
            )
            loss = objective(cands, targets[active].repeat_interleave(k)).cpu().reshape(m, k)
            value, pick = loss.min(dim=1)
            better = value < best[active]
            rows = active[better]
            x[rows] = cands.reshape(m, k, length)[better, pick[better]]
            best[rows] = value[better]
            if progress is not None:
                progress(1)
    return x.to(source.device)


# ------------------------------------------------------------------------------------ conferrable


def conferrable_points(
    source: RunnableModel,
    references: Sequence[RunnableModel],
    surrogates: Sequence[RunnableModel] = (),
    *,
    seeds: torch.Tensor | np.ndarray | None = None,
    n: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    step: float = CORE_STEP,
    avoid: float = AVOID,
    pool: int = CONFERRABLE_POOL,
    halve: Sequence[tuple[float, int]] = CONFERRABLE_HALVE,
    progress: Progress | None = None,
) -> CorePoints:
    """Core points shaped by the owner's models: the source and its `surrogates` give each point's
    target label with confidence, the homolog `references` do not (variant "conferrable").

    Starts are the seed inputs themselves (real inputs: continuous rows of `seeds`, windows of seed text),
    else random draws as `core_points` makes them; each gets a target label the source did not give it.
    Every start is searched (no early stop: pushing the references away goes on after the source is
    confident), minimising, per point,
    CE(source) + mean CE(surrogates) - avoid x mean log(1 - p_reference(target)),
    and of `pool` x n starts the n most conferrable are kept: the source labels them with the target,
    scored by p_source x mean p_surrogate x (1 - max p_reference). Continuous inputs are searched by
    successive halving: at each (fraction of the steps, m) of `halve` the search goes on with the m x n
    most conferrable points only (token searches run every start to the end). The references and
    surrogates must take the source's inputs and answer in its label space (`make_probe` checks and skips
    others); they run as copies prepared for the search (`_for_search`). `n` and `steps` default to
    CONFERRABLE_POINTS and CONFERRABLE_STEPS for continuous inputs, TOKEN_POINTS and TOKEN_STEPS for tokens.
    `progress` is called with 1 after every search step (`steps` in all), for a progress bar.

    Raises:
        VerifyError: no references, the source fails on its inputs or outputs NaN, or its outputs are
            not labels.
        ValueError: a bad argument (n, steps, pool, halve).
    """
    if not references:
        raise VerifyError("conferrable points need at least one homolog reference")
    continuous = source.domain.kind == "continuous"
    n, steps = conferrable_size(source, n, steps)
    kept = [m for _, m in halve]
    if n < 1 or steps < 0 or pool < 1 or any(not 0 <= f <= 1 for f, _ in halve) or kept != sorted(kept, reverse=True) \
            or any(not 1 <= m <= pool for m in kept):
        raise ValueError(f"need n >= 1, steps >= 0, pool >= 1 and halving fractions in [0, 1] to pools from pool "
                         f"down to 1 (got {n}, {steps}, {pool}, {list(halve)})")
    start_time = time.perf_counter()
    require_labels(source)
    gen = torch.Generator().manual_seed(seed)
    size = pool * n
    with Workers(1 + len(surrogates) + len(references), source.device) as workers:
        shaping = _Shaping(source, references, surrogates, avoid, workers)
        never: Done = lambda loss: torch.zeros_like(loss, dtype=torch.bool)  # noqa: E731
        if continuous:
            mean, spread = input_spread(source.domain, seeds)
            if seeds is None:
                starts = mean + spread * torch.randn((size, *source.domain.shape), generator=gen)
            else:
                rows = torch.as_tensor(np.asarray(seeds)).float().reshape(-1, *source.domain.shape)
                starts = rows[torch.randint(0, len(rows), (size,), generator=gen)]
            starts, targets = _targets(source, starts, size, gen)
            x, targets = _ascend_halving(shaping, starts, targets, steps=steps, step=step * spread,
                                         low=mean - 4 * spread, high=mean + 4 * spread,
                                         halve=[(round(f * steps), m * n) for f, m in halve], progress=progress)
        else:
            starts, targets = _targets(source, token_pool(source, seeds, size, gen), size, gen)
            x = _mutate(source, starts, targets, shaping.loss, never, steps=steps, gen=gen, progress=progress)
        targets = targets.to(source.device)
        x = x[shaping.score(x, targets).argsort(descending=True)[:n]]
    # The source's own labels: a point whose search fell short keeps the label the source gives it.
    probs = source.probs(x)
    labels = probs.argmax(dim=1)
    return CorePoints(inputs=x, labels=labels, confidence=probs.gather(1, labels[:, None])[:, 0],
                      variant="conferrable", seconds=time.perf_counter() - start_time)


def conferrable_size(source: RunnableModel, n: int | None, steps: int | None) -> tuple[int, int]:
    """The conferrable search's points and steps for this source: as given, else CONFERRABLE_POINTS and
    CONFERRABLE_STEPS for continuous inputs, TOKEN_POINTS and TOKEN_STEPS for tokens."""
    continuous = source.domain.kind == "continuous"
    return (n if n is not None else CONFERRABLE_POINTS if continuous else TOKEN_POINTS,
            steps if steps is not None else CONFERRABLE_STEPS if continuous else TOKEN_STEPS)


def _ascend_halving(shaping: _Shaping, starts: torch.Tensor, targets: torch.Tensor, *, steps: int,
                    step: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                    halve: Sequence[tuple[int, int]], progress: Progress | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed-gradient steps on every point, keeping at each (step, m) of `halve` the m most conferrable
    points (never more than there are); the points and their targets."""
    device = shaping.device
    x = starts.to(device)
    targets, step, low, high = targets.to(device), step.to(device), low.to(device), high.to(device)
    cuts = sorted(halve)
    for i in range(steps + 1):
        while cuts and cuts[0][0] <= i:
            _, m = cuts.pop(0)
            if m < len(x):
                best = shaping.score(x, targets).argsort(descending=True)[:m]
                x, targets = x[best], targets[best]
        if i == steps:
            break
        grad = shaping.gradient(x, targets)
        with torch.no_grad():
            x = torch.maximum(torch.minimum(x - step * grad.sign(), high), low)
        if progress is not None:
            progress(1)
    return x.detach(), targets


class _Shaping:
    """The source, its surrogates and references as the conferrable search runs them (`_for_search`).

    The loss is a sum of one term per model; the terms' input gradients and the models' probabilities are
    computed by `workers` (side by side on a CPU, one torch thread each) and summed in a fixed order, so
    the points are the same however many run at once.
    """

    def __init__(self, source: RunnableModel, references: Sequence[RunnableModel],
                 surrogates: Sequence[RunnableModel], avoid: float, workers: Workers) -> None:
        self.device = source.device
        self.source = _for_search(source, self.device)
        self.surrogates = [_for_search(m, self.device) for m in surrogates]
        self.references = [_for_search(m, self.device) for m in references]
        self.workers = workers
        surrogate_weight = 1 / max(1, len(self.surrogates))
        reference_weight = avoid / len(self.references)
        # (model, its term's kind, its weight): CE(source) + mean CE(surrogates) - avoid x mean log(1 - p_ref)
        self.terms = ([(self.source, "ce", 1.0)] + [(m, "ce", surrogate_weight) for m in self.surrogates]
                      + [(m, "avoid", reference_weight) for m in self.references])

    @staticmethod
    def _term(term: tuple[Callable[[torch.Tensor], torch.Tensor], str, float], x: torch.Tensor,
              targets: torch.Tensor) -> torch.Tensor:
        model, kind, weight = term
        logits = model(x)
        if kind == "ce":
            return weight * F.cross_entropy(logits, targets, reduction="none")
        p = F.softmax(logits, dim=1).gather(1, targets[:, None])[:, 0]
        return -weight * torch.log1p(-p.clamp(max=1 - 1e-6))

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per point: CE(source) + mean CE(surrogates) - avoid x mean log(1 - p_reference(target))."""
        def one(term: tuple[Callable[[torch.Tensor], torch.Tensor], str, float]) -> torch.Tensor:
            with torch.no_grad():  # grad mode is per thread: set in the worker's
                return self._term(term, x, targets)

        return torch.stack(self.workers.map(one, self.terms)).sum(0)

    def gradient(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss's gradient with respect to the points (each term's on its own copy of them)."""
        def one(term: tuple[Callable[[torch.Tensor], torch.Tensor], str, float]) -> torch.Tensor:
            leaf = x.detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(self._term(term, leaf, targets).sum(), leaf)
            return grad

        return torch.stack(self.workers.map(one, self.terms)).sum(0)

    def score(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per point: p_source x mean p_surrogate x (1 - max p_reference) of the target, -1 where the
        source labels the point otherwise."""
        def logits(model: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():  # grad mode is per thread: set in the worker's
                return model(x)

        out = self.workers.map(logits, [self.source, *self.surrogates, *self.references])
        k = 1 + len(self.surrogates)
        p_source = _p_target(out[0], targets)
        p_surrogates = (torch.stack([_p_target(o, targets) for o in out[1:k]]).mean(0) if self.surrogates
                        else torch.ones_like(p_source))
        p_references = torch.stack([_p_target(o, targets) for o in out[k:]]).max(0).values
        score = p_source * p_surrogates * (1 - p_references)
        score[out[0].argmax(dim=1) != targets] = -1.0
        return score


def _p_target(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1).gather(1, targets[:, None])[:, 0]


def _for_search(model: RunnableModel, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's outputs on `device` (the source's), as the search runs it hundreds of times on the same
    pool: a copy with every eval-mode BatchNorm folded into the convolution or linear layer before it
    (`torch.fx` fusion) and, for image convolutions, channels-last memory (oneDNN's fast layout). The same
    function up to float rounding, for about 40% less time on the zoo's CNNs and ResNets. A module that
    `torch.fx` cannot trace runs as it is."""
    module = model.module
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        try:
            module = fuse(module)  # a traced copy: the model's own module is left as it is
        except Exception:  # any module fx cannot trace (control flow, custom ops) runs unfused
            module = model.module
    if module is not model.module and any(isinstance(m, nn.Conv2d) for m in module.modules()):
        module = module.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = module(x.to(model.device))
        if not torch.isfinite(out).all():
            raise VerifyError(f"{model.name}: non-finite outputs while searching core points")
        return out.to(device).float()

    return run


def require_labels(model: RunnableModel) -> None:
    """Core points and the label methods need a classifier: refuse a model whose outputs are an embedding."""
    if model.outputs != "labels":
        raise VerifyError(f"{model.name} outputs an embedding, not labels: compare it with ddv")
