"""The PyTorch reference decoder: greedy, beam search and sampling with a KV cache.

The served ONNX path must reproduce these outputs token for token, so every rule that
decides a token is spelled out here and kept simple enough to port:

* Greedy: argmax of the step's raw logits, ties to the lowest id (torch.argmax).
* Scores: sum of log_softmax(raw logits) (temperature 1) of the generated tokens, EOS and
  stop tokens included, accumulated in float32 one step at a time.
* Beam search: candidates beam_score + log-prob ordered by score, ties to the lower flat
  index (beam * V + token); the first 2K are walked in order; an EOS (or a completed stop
  sequence) ranked < K is finished, others extend the K live beams. A source is done when
  it has K finished hypotheses, when no live beam can beat the n_best-th finished one, or
  at its token limit (live beams then finish with "length"). normalized_score =
  score / len ** length_penalty, len counting the generated tokens incl. EOS/stop tokens.
* Sampling: logits / temperature -> top-k -> top-p, then one float64 uniform draw u per
  sequence and step from a torch.Generator seeded with `seed` (one generator per
  sequence, so a batch gives what each request gives alone); the token is the first,
  in (probability descending, id ascending) order, whose cumulative probability exceeds
  u * total.
* Length: each sequence generates at most new_token_limit(...) tokens: max_new_tokens,
  capped so decoder positions stay < max_positions.
* Stop sequences: checked on generated tokens only; the longest matching one is removed
  from the output (its log-probs stay in the score, like EOS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from transformer.config import TransformerConfig
from transformer.model import KV, DecoderOnly, EncoderDecoder

_MAX_SEED = 2**64 - 1
# Far below it, float32 logits / temperature overflow to inf (1e-40 did): the
# probabilities become NaN and the draw picks an arbitrary token. The service's floor
# (service.validation.MIN_TEMPERATURE, 1e-6 as a float32) is above this one.
MIN_TEMPERATURE = 1e-7


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode one request; validated on construction so a bad request fails early."""

    max_new_tokens: int = 128
    beam_size: int = 1
    n_best: int = 1
    # Beam score = sum_logprob / (len ** length_penalty); len counts generated tokens incl. EOS.
    length_penalty: float = 1.0
    # 0 -> greedy / beam search (argmax); > 0 -> sampling.
    temperature: float = 0.0
    # Keep the k most likely tokens when sampling (0 = off).
    top_k: int = 0
    # Nucleus: keep the smallest set whose probability mass is >= top_p, in (0, 1].
    top_p: float = 1.0
    seed: int | None = None
    # Stop token sequences; the matched stop tokens are removed from the output.
    stop: tuple[tuple[int, ...], ...] = ()
    return_alignment: bool = False

    def __post_init__(self) -> None:
        # Accept lists from JSON callers but store tuples, so the options stay hashable.
        try:
            stop = tuple(tuple(seq) for seq in self.stop)
        except TypeError as error:
            raise ValueError(
                f"stop must be a sequence of token-id sequences, got {self.stop!r}"
            ) from error
        object.__setattr__(self, "stop", stop)
        self.validate()

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def validate(self) -> None:
        """Raise ValueError naming the field and its limit."""

        def at_least(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

        at_least("max_new_tokens", 1)
        at_least("beam_size", 1)
        at_least("n_best", 1)
        at_least("top_k", 0)
        if self.n_best > self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) must be <= beam_size ({self.beam_size})")
        if not _is_real(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if (
            not _is_real(self.temperature)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
            or 0 < self.temperature < MIN_TEMPERATURE
        ):
            raise ValueError(
                f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got "
                f"{self.temperature!r}"
            )
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED):
            raise ValueError(
                f"seed must be None or an integer in [0, 2**64 - 1], got {self.seed!r}"
            )
        if self.sampling and self.beam_size > 1:
            raise ValueError(
                f"beam_size ({self.beam_size}) must be 1 when sampling "
                f"(temperature={self.temperature}); use temperature=0 for beam search"
            )
        for seq in self.stop:
            if not seq or not all(_is_int(t) and t >= 0 for t in seq):
                raise ValueError(
                    f"stop sequences must be non-empty sequences of token ids >= 0, got {seq!r}"
                )
        if not isinstance(self.return_alignment, bool):
            raise ValueError(f"return_alignment must be a bool, got {self.return_alignment!r}")


@dataclass
class Hypothesis:
    """One decoded output, with what the service reports about it."""

    tokens: list[int]  # generated ids, without BOS/start and EOS (and removed stop tokens)
    score: float  # sum of log-probs of the generated tokens, incl. EOS / stop tokens
    normalized_score: float  # score / len ** length_penalty (beam); = score otherwise
    finish_reason: str  # "eos" | "length" | "stop"
    # [len(tokens), S_src]: last decoder layer's cross-attention, averaged over heads.
    alignment: list[list[float]] | None = None


class _Stepper(Protocol):
    """One model behind the decoding loops: rows of a batch, one new token per step."""

    def first(self) -> tuple[Tensor, Tensor | None]:
        """Logits [R, V] for the first generated token (and alignment [R, S] if asked)."""
        ...

    def next(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """Feed tokens [R]; logits [R, V] for the following token."""
        ...

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder, repeat) the batch rows `rows` [R'] of every cached tensor."""
        ...


def _select_kv(cache: list[KV], rows: Tensor) -> list[KV]:
    return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in cache]


class _TranslatorStepper:
    """Encodes the padded sources once, then runs the decoder one token at a time."""

    def __init__(
        self, model: EncoderDecoder, sources: list[list[int]], need_alignment: bool
    ) -> None:
        config = model.config
        device = next(model.parameters()).device
        lengths = torch.tensor([len(s) for s in sources], device=device)
        src = torch.full((len(sources), int(lengths.max())), config.pad_id, device=device)
        for i, seq in enumerate(sources):
            src[i, : len(seq)] = torch.tensor(seq, device=device)
        # [B, S] from the lengths, not from pad_id, so a pad id inside a source is kept.
        self.src_mask = torch.arange(src.size(1), device=device)[None, :] < lengths[:, None]
        memory, _ = model.encode(src, self.src_mask)
        self.model = model
        self.cross = model.cross_kv(memory)
        self.past: list[KV] | None = None
        self.need_alignment = need_alignment
        self.start = torch.full((len(sources),), config.decoder_start_id, device=device)

    def _run(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.model.decode(
            tokens[:, None], self.cross, self.src_mask, past=self.past,
            need_weights=self.need_alignment,
        )  # fmt: skip
        self.past = out.past
        align = None
        if out.cross_attention is not None:
            align = out.cross_attention[-1][:, :, -1, :].mean(dim=1)  # [R, H, S] -> [R, S]
        return out.logits[:, -1, :], align

    def first(self) -> tuple[Tensor, Tensor | None]:
        return self._run(self.start)

    def next(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        return self._run(tokens)

    def select(self, rows: Tensor) -> None:
        self.cross = _select_kv(self.cross, rows)
        self.src_mask = self.src_mask.index_select(0, rows)
        if self.past is not None:
            self.past = _select_kv(self.past, rows)


class _LanguageModelStepper:
    """Left-pads the prompts so they end together; explicit positions and a key mask make
    each row compute what it would alone."""

    def __init__(self, model: DecoderOnly, prompts: list[list[int]]) -> None:
        config = model.config
        device = next(model.parameters()).device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        width = int(lengths.max())
        ids = torch.full((len(prompts), width), config.pad_id, device=device)
        for i, seq in enumerate(prompts):
            ids[i, width - len(seq) :] = torch.tensor(seq, device=device)
        offset = (width - lengths)[:, None]  # [B, 1] pads before each prompt
        columns = torch.arange(width, device=device)[None, :]  # [1, L]
        self.model = model
        self.ids = ids
        self.key_mask = columns >= offset  # [B, L]
        self.prompt_positions = (columns - offset).clamp(min=0)  # [B, L]
        self.next_position = lengths  # [B]
        self.past: list[KV] | None = None

    def first(self) -> tuple[Tensor, Tensor | None]:
        out = self.model.decode(self.ids, self.prompt_positions, None, self.key_mask)
        self.past = out.past
        return out.logits[:, -1, :], None

    def next(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        real = torch.ones_like(self.key_mask[:, :1])  # [R, 1]
        self.key_mask = torch.cat([self.key_mask, real], dim=1)  # [R, L + t]
        out = self.model.decode(
            tokens[:, None], self.next_position[:, None], self.past, self.key_mask
        )
        self.past = out.past
        self.next_position = self.next_position + 1
        return out.logits[:, -1, :], None

    def select(self, rows: Tensor) -> None:
        self.key_mask = self.key_mask.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)
        if self.past is not None:
            self.past = _select_kv(self.past, rows)


def _pool_add(pool: list[Hypothesis], hyp: Hypothesis) -> None:
    """Add a finished hypothesis to a beam's pool, once per token sequence: one cut by a
    stop sequence can equal one that ended at EOS, and counting both would end the search
    (K finished, or n_best finished) with fewer than n_best distinct answers. The better
    one stays (the first on a tie, as the n-best's stable sort keeps it)."""
    for i, other in enumerate(pool):
        if other.tokens == hyp.tokens:
            if hyp.normalized_score > other.normalized_score:
                pool[i] = hyp
            return
    pool.append(hyp)


def _stop_match(tokens: list[int], stop: Sequence[tuple[int, ...]]) -> int:
    """Length of the longest stop sequence that `tokens` ends with (0: none)."""
    best = 0
    for seq in stop:
        n = len(seq)
        if n > best and len(tokens) >= n and tuple(tokens[-n:]) == seq:
            best = n
    return best


def _finish(
    tokens: list[int],
    alignment: list[list[float]] | None,
    score: float,
    eos_id: int,
    options: DecodingOptions,
    at_last_step: bool,
    length_penalty: float | None,
) -> Hypothesis | None:
    """The Hypothesis if `tokens` (just extended) ends the sequence, else None.

    length_penalty None: greedy/sampling, normalized_score = score.
    """
    reason = None
    drop = 0
    if tokens[-1] == eos_id:
        reason, drop = "eos", 1
    elif (drop := _stop_match(tokens, options.stop)) > 0:
        reason = "stop"
    elif at_last_step:
        reason = "length"
    if reason is None:
        return None
    length = len(tokens)
    normalized = score if length_penalty is None else score / length**length_penalty
    keep = length - drop
    return Hypothesis(
        tokens=tokens[:keep],
        score=score,
        normalized_score=normalized,
        finish_reason=reason,
        alignment=None if alignment is None else alignment[:keep],
    )


def _make_generators(n: int, seed: int | None) -> list[torch.Generator]:
    """One CPU generator per sequence: a request's samples do not depend on its batch."""
    generators = []
    for _ in range(n):
        g = torch.Generator()
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        generators.append(g)
    return generators


def _sample(logits: Tensor, options: DecodingOptions, generators: list[torch.Generator]) -> Tensor:
    """logits [R, V] -> sampled ids [R]: temperature, top-k, top-p, inverse CDF."""
    scaled = logits.float() / options.temperature
    # Probability-descending order, ties to the lower id, so top-k/top-p cut reproducibly.
    ordered, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # [R, V]
    if 0 < options.top_k < ordered.size(-1):
        ordered[:, options.top_k :] = -math.inf
    probs = torch.softmax(ordered, dim=-1)  # [R, V]
    if options.top_p < 1.0:
        mass_before = probs.cumsum(dim=-1) - probs  # [R, V]
        outside = mass_before >= options.top_p
        outside[:, 0] = False  # always keep the most likely token
        probs = probs.masked_fill(outside, 0.0)
    cdf = probs.double().cumsum(dim=-1)  # [R, V]
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    target = (u.to(cdf.device) * cdf[:, -1])[:, None]  # [R, 1]
    index = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.size(-1) - 1)  # [R, 1]
    return order.gather(1, index).squeeze(1)  # [R]


def _decode_single(
    stepper: _Stepper,
    n: int,
    config: TransformerConfig,
    options: DecodingOptions,
    source_lengths: list[int] | None,
    limits: list[int],
) -> list[list[Hypothesis]]:
    """Greedy or sampling: one hypothesis per sequence, finished rows leave the batch."""
    logits, align = stepper.first()
    alive = list(range(n))  # batch row -> sequence
    tokens: list[list[int]] = [[] for _ in range(n)]
    aligns: list[list[list[float]]] | None = None if align is None else [[] for _ in range(n)]
    scores = torch.zeros(n, dtype=torch.float32, device=logits.device)  # [R]
    generators = _make_generators(n, options.seed) if options.sampling else []
    results: list[list[Hypothesis]] = [[] for _ in range(n)]
    for step in range(max(limits)):
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
        if options.sampling:
            chosen = _sample(logits, options, [generators[i] for i in alive])
        else:
            chosen = torch.argmax(logits, dim=-1)  # [R]
        scores = scores + logprobs.gather(1, chosen[:, None]).squeeze(1)
        chosen_list = chosen.tolist()
        keep: list[int] = []
        for row, seq in enumerate(alive):
            tokens[seq].append(chosen_list[row])
            if aligns is not None and align is not None and source_lengths is not None:
                aligns[seq].append(align[row, : source_lengths[seq]].tolist())
            hyp = _finish(
                tokens[seq],
                None if aligns is None else aligns[seq],
                float(scores[row]),
                config.eos_id,
                options,
                step + 1 == limits[seq],
                None,
            )
            if hyp is None:
                keep.append(row)
            else:
                results[seq] = [hyp]
        if not keep:
            break
        if len(keep) < len(alive):
            rows = torch.tensor(keep, device=logits.device)
            stepper.select(rows)
            chosen, scores = chosen.index_select(0, rows), scores.index_select(0, rows)
            alive = [alive[r] for r in keep]
        logits, align = stepper.next(chosen)
    return results


def _best_possible(score: float, length: int, limit: int, length_penalty: float) -> float:
    """Upper bound of the normalized score of any completion of a live beam of `length`
    tokens with sum log-prob `score` (<= 0): later tokens only lower the sum, so the bound
    takes the final length (length + 1 .. limit) that divides it most favourably."""
    final_length = limit if length_penalty > 0 else min(length + 1, limit)
    return score / final_length**length_penalty


def _beam_search(
    stepper: _Stepper,
    n: int,
    config: TransformerConfig,
    options: DecodingOptions,
    source_lengths: list[int] | None,
    limits: list[int],
) -> list[list[Hypothesis]]:
    """Beam search over n sequences at once; rows a*K .. a*K+K-1 are sequence a's beams."""
    k = options.beam_size
    logits, align = stepper.first()  # [n, V]
    device = logits.device
    expand = torch.arange(n, device=device).repeat_interleave(k)  # [n*K]
    stepper.select(expand)
    logits = logits.index_select(0, expand)
    align = None if align is None else align.index_select(0, expand)
    # Only the first beam is live at the start, so the K beams do not repeat each other.
    beam_scores = torch.tensor([0.0] + [-math.inf] * (k - 1), device=device).repeat(n)  # [n*K]
    alive = list(range(n))
    tokens: list[list[int]] = [[] for _ in range(n * k)]
    want_align = align is not None and source_lengths is not None
    aligns: list[list[list[float]]] = [[] for _ in range(n * k)]
    pools: list[list[Hypothesis]] = [[] for _ in range(n)]
    for step in range(max(limits)):
        length = step + 1
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
        vocab = logprobs.size(-1)
        candidates = (beam_scores[:, None] + logprobs).view(len(alive), k * vocab)  # [A, K*V]
        top_scores, top_index = torch.sort(candidates, dim=-1, descending=True, stable=True)
        top_scores_list = top_scores[:, : 2 * k].tolist()
        top_index_list = top_index[:, : 2 * k].tolist()
        origins: list[int] = []
        new_tokens: list[int] = []
        new_scores: list[float] = []
        new_seqs: list[list[int]] = []
        new_aligns: list[list[list[float]]] = []
        next_alive: list[int] = []
        for a, seq_id in enumerate(alive):
            live: list[tuple[int, int, float, list[int], list[list[float]]]] = []
            pool = pools[seq_id]
            for rank in range(min(2 * k, len(top_scores_list[a]))):
                score = top_scores_list[a][rank]
                if score == -math.inf:
                    break
                flat = top_index_list[a][rank]
                row, token = a * k + flat // vocab, flat % vocab
                seq = [*tokens[row], token]
                seq_align = aligns[row]
                if want_align and align is not None and source_lengths is not None:
                    seq_align = [*seq_align, align[row, : source_lengths[seq_id]].tolist()]
                hyp = _finish(
                    seq,
                    seq_align if want_align else None,
                    score,
                    config.eos_id,
                    options,
                    False,
                    options.length_penalty,
                )
                if hyp is not None:
                    if rank < k:
                        _pool_add(pool, hyp)
                    continue
                live.append((row, token, score, seq, seq_align))
                if len(live) == k:
                    break
            if length == limits[seq_id]:
                for _, _, score, seq, seq_align in live:
                    pool.append(
                        Hypothesis(
                            tokens=seq,
                            score=score,
                            normalized_score=score / len(seq) ** options.length_penalty,
                            finish_reason="length",
                            alignment=seq_align if want_align else None,
                        )
                    )
                continue
            if not live or len(pool) >= k:
                continue
            if len(pool) >= options.n_best:
                ranked = sorted((h.normalized_score for h in pool), reverse=True)
                bound = max(
                    _best_possible(s, length, limits[seq_id], options.length_penalty)
                    for _, _, s, _, _ in live
                )
                if bound <= ranked[options.n_best - 1]:
                    continue
            # Fewer than K live candidates (tiny vocabularies): pad with dead beams.
            live += [(live[0][0], live[0][1], -math.inf, live[0][3], live[0][4])] * (k - len(live))
            next_alive.append(seq_id)
            for row, token, score, seq, seq_align in live:
                origins.append(row)
                new_tokens.append(token)
                new_scores.append(score)
                new_seqs.append(seq)
                new_aligns.append(seq_align)
        if not next_alive:
            break
        stepper.select(torch.tensor(origins, device=device))
        logits, align = stepper.next(torch.tensor(new_tokens, device=device))
        beam_scores = torch.tensor(new_scores, dtype=torch.float32, device=device)  # [A'*K]
        tokens, aligns, alive = new_seqs, new_aligns, next_alive
    results = []
    for pool in pools:
        best: list[Hypothesis] = []
        for hyp in sorted(pool, key=lambda h: h.normalized_score, reverse=True):
            if all(hyp.tokens != other.tokens for other in best):
                best.append(hyp)
            if len(best) == options.n_best:
                break
        results.append(best)
    return results


def _run(
    model: EncoderDecoder | DecoderOnly,
    inputs: list[list[int]],
    options: DecodingOptions,
    beam: bool,
    source_lengths: list[int] | None,
    limits: list[int],
) -> list[list[Hypothesis]]:
    was_training = model.training
    model.eval()  # dropout off, whatever state the caller left the model in
    try:
        with torch.inference_mode():
            stepper: _Stepper
            if isinstance(model, EncoderDecoder):
                stepper = _TranslatorStepper(model, inputs, options.return_alignment)
            else:
                stepper = _LanguageModelStepper(model, inputs)
            search = _beam_search if beam else _decode_single
            return search(stepper, len(inputs), model.config, options, source_lengths, limits)
    finally:
        model.train(was_training)


def new_token_limit(config: TransformerConfig, input_length: int, max_new_tokens: int) -> int:
    """How many tokens a sequence may generate: max_new_tokens, capped so that every
    position fed to the decoder stays < max_positions (reaching the cap is "length").

    Per sequence, so a long prompt does not shorten its batch-mates' outputs. The last
    generated token is never fed, hence the + 1 for a decoder-only model.
    """
    if config.arch == "encoder-decoder":
        return min(max_new_tokens, config.max_positions)
    return min(max_new_tokens, config.max_positions - input_length + 1)


def _prepare(
    model: EncoderDecoder | DecoderOnly,
    name: str,
    inputs: list[list[int]],
    options: DecodingOptions,
    beam: bool,
) -> list[list[Hypothesis]]:
    """Check the request, cap each sequence's length, then run the search."""
    options.validate()
    config = model.config
    for i, seq in enumerate(inputs):
        if len(seq) == 0:
            raise ValueError(f"{name}[{i}] is empty")
        if len(seq) > config.max_positions:
            raise ValueError(
                f"{name}[{i}] has {len(seq)} tokens, more than max_positions "
                f"({config.max_positions})"
            )
        if not all(_is_int(t) and 0 <= t < config.vocab_size for t in seq):
            raise ValueError(
                f"{name}[{i}] has token ids outside [0, vocab_size={config.vocab_size})"
            )
    if not inputs:
        return []
    limits = [new_token_limit(config, len(seq), options.max_new_tokens) for seq in inputs]
    lengths = [len(s) for s in inputs] if options.return_alignment else None
    return _run(model, inputs, options, beam, lengths, limits)


def _translate(
    model: EncoderDecoder, sources: list[list[int]], options: DecodingOptions, beam: bool
) -> list[list[Hypothesis]]:
    """translate() with the search chosen explicitly (tests run beam search with K=1)."""
    return _prepare(model, "sources", sources, options, beam)


def translate(
    model: EncoderDecoder, sources: list[list[int]], options: DecodingOptions
) -> list[list[Hypothesis]]:
    """n_best hypotheses per source, best first.

    sources are token ids already ending with EOS; they are right-padded into one batch,
    encoded once, and decoded one token per step with cached keys and values.
    """
    return _translate(model, sources, options, beam=options.beam_size > 1)


def _generate(
    model: DecoderOnly, prompts: list[list[int]], options: DecodingOptions, beam: bool
) -> list[list[Hypothesis]]:
    """generate() with the search chosen explicitly (tests run beam search with K=1)."""
    options.validate()
    if options.return_alignment:
        raise ValueError("return_alignment is only available for translation (cross-attention)")
    return _prepare(model, "prompts", prompts, options, beam)


def generate(
    model: DecoderOnly, prompts: list[list[int]], options: DecodingOptions
) -> list[list[Hypothesis]]:
    """Continue each prompt (used as given: the caller adds BOS); n_best per prompt.

    Prompts of different lengths share a batch (left-padded, explicit positions and key
    mask) and each gets what it would get alone.
    """
    return _generate(model, prompts, options, beam=options.beam_size > 1)


__all__ = ["DecodingOptions", "Hypothesis", "generate", "new_token_limit", "translate"]
