"""The reference decoder: the served ONNX path is checked against it token for token, so
its own rules (greedy = beam 1, batching changes nothing, seeds reproduce) must hold."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from transformer import decoding
from transformer.config import TransformerConfig
from transformer.decoding import DecodingOptions, Hypothesis, generate, translate
from transformer.model import DecoderOnly, EncoderDecoder, build_model

SOURCES = [[5, 6, 7, 3], [8, 9, 3], [4, 4, 4, 4, 4, 3], [10, 11, 12, 13, 20, 21, 3]]
PROMPTS = [[2, 5, 6], [2, 7], [2, 8, 9, 10, 11, 12], [2]]


def tiny(arch: str, seed: int = 0, eos_bias: float = 1.0, **overrides: Any) -> Any:
    """A random model whose outputs vary (an untied, wide output layer) and sometimes end
    with EOS (a logit bias on it), so that every finish reason shows up."""
    fields: dict[str, Any] = dict(
        arch=arch,
        vocab_size=24,
        d_model=32,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=64,
        dropout=0.0,
        max_positions=64,
        tie_output=False,
        final_logits_bias=True,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = build_model(TransformerConfig(**fields)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.generator.proj.weight, std=0.5)
        assert model.generator.final_logits_bias is not None
        model.generator.final_logits_bias[model.config.eos_id] = eos_bias
    return model


@pytest.fixture(scope="module")
def translator() -> EncoderDecoder:
    return tiny("encoder-decoder")


@pytest.fixture(scope="module")
def lm() -> DecoderOnly:
    return tiny("decoder-only", positional="learned")


def same(a: Hypothesis, b: Hypothesis, exact_score: bool = True) -> None:
    assert a.tokens == b.tokens
    assert a.finish_reason == b.finish_reason
    if exact_score:
        assert a.score == b.score
    else:
        assert a.score == pytest.approx(b.score, abs=1e-4)


# --- greedy and beam ------------------------------------------------------------------


def test_greedy_finishes_with_every_reason(translator: EncoderDecoder) -> None:
    """Guards the fixtures: the tests below only mean something if both reasons occur."""
    results = translate(translator, SOURCES, DecodingOptions(max_new_tokens=12))
    reasons = {r[0].finish_reason for r in results}
    assert reasons == {"eos", "length"}
    for (hyp,) in results:
        assert hyp.normalized_score == hyp.score
        assert len(hyp.tokens) <= 12 and translator.config.eos_id not in hyp.tokens


def test_greedy_equals_naive_full_recomputation(translator: EncoderDecoder) -> None:
    options = DecodingOptions(max_new_tokens=12)
    config = translator.config
    for src, (hyp,) in zip(SOURCES, translate(translator, SOURCES, options), strict=True):
        tgt = [config.decoder_start_id]
        score = 0.0
        with torch.inference_mode():
            for _ in range(options.max_new_tokens):
                logits = translator(torch.tensor([src]), torch.tensor([tgt]))[0, -1]
                token = int(logits.argmax())
                score += float(torch.log_softmax(logits, -1)[token])
                tgt.append(token)
                if token == config.eos_id:
                    break
        generated = tgt[1:]
        if generated[-1] == config.eos_id:
            generated.pop()
        assert hyp.tokens == generated
        assert hyp.score == pytest.approx(score, abs=1e-4)


def test_lm_greedy_equals_naive_full_recomputation(lm: DecoderOnly) -> None:
    options = DecodingOptions(max_new_tokens=10)
    for prompt, (hyp,) in zip(PROMPTS, generate(lm, PROMPTS, options), strict=True):
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(options.max_new_tokens):
                token = int(lm(torch.tensor([ids]))[0, -1].argmax())
                ids.append(token)
                if token == lm.config.eos_id:
                    break
        generated = ids[len(prompt) :]
        assert hyp.tokens == [t for t in generated if t != lm.config.eos_id]


def test_beam_size_one_equals_greedy(translator: EncoderDecoder, lm: DecoderOnly) -> None:
    options = DecodingOptions(max_new_tokens=12, return_alignment=True)
    greedy = translate(translator, SOURCES, options)
    beam = decoding._translate(translator, SOURCES, options, beam=True)
    for (g,), (b,) in zip(greedy, beam, strict=True):
        same(g, b)
        assert g.alignment == b.alignment
    options = DecodingOptions(max_new_tokens=10)
    greedy = generate(lm, PROMPTS, options)
    beam = decoding._generate(lm, PROMPTS, options, beam=True)
    for (g,), (b,) in zip(greedy, beam, strict=True):
        same(g, b)


def naive_beam_search(
    model: EncoderDecoder, src: list[int], options: DecodingOptions
) -> list[tuple[list[int], float, str]]:
    """The documented beam rules, one beam at a time with full recomputation: checks the
    batched, cached, reordered implementation against the plain reading of the rules."""
    config, k, penalty = model.config, options.beam_size, options.length_penalty
    beams: list[tuple[list[int], torch.Tensor]] = [([], torch.tensor(0.0))]
    pool: list[tuple[list[int], float, float, str]] = []
    for step in range(options.max_new_tokens):
        length = step + 1
        candidates = []
        for b, (tokens, score) in enumerate(beams):
            tgt = torch.tensor([[config.decoder_start_id, *tokens]])
            with torch.inference_mode():
                logprobs = torch.log_softmax(model(torch.tensor([src]), tgt)[0, -1], -1)
            vocab = logprobs.numel()
            candidates += [(score + logprobs[t], b * vocab + t, b, t) for t in range(vocab)]
        candidates.sort(key=lambda c: (-float(c[0]), c[1]))
        live: list[tuple[list[int], torch.Tensor]] = []
        for rank, (score, _, b, token) in enumerate(candidates[: 2 * k]):
            seq = [*beams[b][0], token]
            if token == config.eos_id:
                if rank < k:
                    pool.append((seq[:-1], float(score), float(score) / length**penalty, "eos"))
                continue
            live.append((seq, score))
            if len(live) == k:
                break
        if length == options.max_new_tokens:
            pool += [(t, float(s), float(s) / length**penalty, "length") for t, s in live]
            break
        if len(pool) >= k:
            break
        beams = live
    pool.sort(key=lambda h: -h[2])
    return [(tokens, score, reason) for tokens, score, _, reason in pool[: options.n_best]]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -0.5])
@pytest.mark.parametrize("n_best", [1, 3])
def test_beam_search_equals_naive_reference(
    translator: EncoderDecoder, length_penalty: float, n_best: int
) -> None:
    """n_best < beam_size also exercises the early stop (no live beam can win)."""
    options = DecodingOptions(
        max_new_tokens=8, beam_size=3, n_best=n_best, length_penalty=length_penalty
    )
    for src, hyps in zip(SOURCES, translate(translator, SOURCES, options), strict=True):
        expected = naive_beam_search(translator, src, options)
        assert [(h.tokens, h.finish_reason) for h in hyps] == [(t, r) for t, _, r in expected]
        assert [h.score for h in hyps] == pytest.approx([s for _, s, _ in expected], abs=1e-4)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_batched_translate_equals_one_by_one(translator: EncoderDecoder, beam_size: int) -> None:
    options = DecodingOptions(
        max_new_tokens=12, beam_size=beam_size, n_best=beam_size, return_alignment=True
    )
    batched = translate(translator, SOURCES, options)
    for src, hyps in zip(SOURCES, batched, strict=True):
        (alone,) = translate(translator, [src], options)
        assert len(hyps) == len(alone) == beam_size
        for a, b in zip(hyps, alone, strict=True):
            same(a, b, exact_score=False)
            assert a.alignment is not None and b.alignment is not None
            torch.testing.assert_close(torch.tensor(a.alignment), torch.tensor(b.alignment))


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_generate_mixed_lengths_equals_one_by_one(positional: str, beam_size: int) -> None:
    model = tiny("decoder-only", positional=positional)
    options = DecodingOptions(max_new_tokens=10, beam_size=beam_size, n_best=beam_size)
    batched = generate(model, PROMPTS, options)
    for prompt, hyps in zip(PROMPTS, batched, strict=True):
        (alone,) = generate(model, [prompt], options)
        assert len(hyps) == len(alone) == beam_size
        for a, b in zip(hyps, alone, strict=True):
            same(a, b, exact_score=False)


def test_n_best_distinct_and_sorted(translator: EncoderDecoder) -> None:
    options = DecodingOptions(max_new_tokens=12, beam_size=5, n_best=4, length_penalty=0.6)
    for hyps in translate(translator, SOURCES, options):
        assert len(hyps) == 4
        assert len({tuple(h.tokens) for h in hyps}) == 4
        normalized = [h.normalized_score for h in hyps]
        assert normalized == sorted(normalized, reverse=True)
        for h in hyps:
            length = len(h.tokens) + (h.finish_reason == "eos")
            assert h.normalized_score == pytest.approx(h.score / length**0.6)


def test_max_new_tokens_finishes_with_length() -> None:
    no_eos = tiny("encoder-decoder", eos_bias=-1e4)
    for beam_size in (1, 3):
        options = DecodingOptions(max_new_tokens=5, beam_size=beam_size)
        for (hyp,) in translate(no_eos, SOURCES, options):
            assert hyp.finish_reason == "length" and len(hyp.tokens) == 5


# --- stop sequences -------------------------------------------------------------------


def test_stop_sequence_ends_and_is_removed(translator: EncoderDecoder, lm: DecoderOnly) -> None:
    base = DecodingOptions(max_new_tokens=12, return_alignment=True)
    full = translate(translator, [SOURCES[1]], base)[0][0]
    assert len(full.tokens) >= 4
    stop = tuple(full.tokens[2:4])
    cut = next(i for i in range(len(full.tokens)) if tuple(full.tokens[i : i + 2]) == stop)
    options = DecodingOptions(max_new_tokens=12, return_alignment=True, stop=(stop, (99, 98)))
    hyp = translate(translator, [SOURCES[1]], options)[0][0]
    assert hyp.finish_reason == "stop"
    assert hyp.tokens == full.tokens[:cut]
    assert hyp.alignment is not None and len(hyp.alignment) == cut

    full_lm = generate(lm, [PROMPTS[0]], DecodingOptions(max_new_tokens=10))[0][0]
    token = full_lm.tokens[3]
    hyp_lm = generate(lm, [PROMPTS[0]], DecodingOptions(max_new_tokens=10, stop=((token,),)))[0][0]
    assert hyp_lm.finish_reason == "stop"
    assert hyp_lm.tokens == full_lm.tokens[: full_lm.tokens.index(token)]


def test_a_stop_cut_equal_to_an_eos_answer_counts_once_in_the_n_best() -> None:
    """A hypothesis cut by a stop sequence can equal one that ended at EOS (here both are
    empty): counted twice, the search ended with one answer of the two asked for."""
    model = tiny("encoder-decoder", eos_bias=5.0)
    source = SOURCES[1]
    with torch.inference_mode():
        first = model(torch.tensor([source]), torch.tensor([[2]]))[0, -1]
    top = next(t for t in first.argsort(descending=True).tolist() if t != 3)  # not EOS
    options = DecodingOptions(max_new_tokens=8, beam_size=2, n_best=2, stop=((top,),))
    hyps = translate(model, [source], options)[0]
    assert len(hyps) == 2 and hyps[0].tokens != hyps[1].tokens


def test_longest_matching_stop_sequence_is_removed(lm: DecoderOnly) -> None:
    full = generate(lm, [PROMPTS[0]], DecodingOptions(max_new_tokens=10))[0][0]
    a, b = full.tokens[0], full.tokens[1]
    options = DecodingOptions(max_new_tokens=10, stop=((b,), (a, b)))
    hyp = generate(lm, [PROMPTS[0]], options)[0][0]
    assert a != b  # guards the fixture: (b,) alone does not match the first token
    assert hyp.tokens == [] and hyp.finish_reason == "stop"


# --- alignment ------------------------------------------------------------------------


@pytest.mark.parametrize("beam_size", [1, 3])
def test_alignment_rows_cover_the_source(translator: EncoderDecoder, beam_size: int) -> None:
    options = DecodingOptions(max_new_tokens=8, beam_size=beam_size, return_alignment=True)
    for src, hyps in zip(SOURCES, translate(translator, SOURCES, options), strict=True):
        alignment = hyps[0].alignment
        assert alignment is not None and len(alignment) == len(hyps[0].tokens)
        for row in alignment:
            assert len(row) == len(src)
            assert sum(row) == pytest.approx(1.0, abs=1e-5)
    assert translate(translator, SOURCES, DecodingOptions(max_new_tokens=3))[0][0].alignment is None


# --- sampling -------------------------------------------------------------------------


def test_sampling_is_reproducible_per_seed() -> None:
    no_eos = tiny("encoder-decoder", eos_bias=-1e4)
    hot: dict[str, Any] = dict(max_new_tokens=16, temperature=50.0)  # ~uniform over 24 ids
    runs = [translate(no_eos, SOURCES[:1], DecodingOptions(**hot, seed=s))[0][0] for s in range(4)]
    again = translate(no_eos, SOURCES[:1], DecodingOptions(**hot, seed=0))[0][0]
    same(runs[0], again)
    assert len({tuple(h.tokens) for h in runs}) == 4


def test_sampling_seed_is_per_request(translator: EncoderDecoder) -> None:
    """A request samples the same tokens whatever else shares its batch."""
    options = DecodingOptions(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    batched = translate(translator, SOURCES, options)
    for src, (hyp,) in zip(SOURCES, batched, strict=True):
        same(hyp, translate(translator, [src], options)[0][0], exact_score=False)


def test_top_k_one_equals_greedy(translator: EncoderDecoder, lm: DecoderOnly) -> None:
    greedy = translate(translator, SOURCES, DecodingOptions(max_new_tokens=12))
    sampled = translate(
        translator, SOURCES, DecodingOptions(max_new_tokens=12, temperature=1.0, top_k=1, seed=3)
    )
    for (g,), (s,) in zip(greedy, sampled, strict=True):
        same(g, s)
    greedy = generate(lm, PROMPTS, DecodingOptions(max_new_tokens=8))
    sampled = generate(lm, PROMPTS, DecodingOptions(max_new_tokens=8, temperature=0.7, top_k=1))
    for (g,), (s,) in zip(greedy, sampled, strict=True):
        same(g, s)


def test_tiny_top_p_equals_greedy(translator: EncoderDecoder) -> None:
    greedy = translate(translator, SOURCES, DecodingOptions(max_new_tokens=12))
    sampled = translate(
        translator, SOURCES, DecodingOptions(max_new_tokens=12, temperature=1.0, top_p=1e-6)
    )
    for (g,), (s,) in zip(greedy, sampled, strict=True):
        same(g, s)


def test_top_k_and_top_p_filter() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    seen_k, seen_p = set(), set()
    for seed in range(200):
        g = [torch.Generator().manual_seed(seed)]
        options = DecodingOptions(temperature=1.0, top_k=2)
        seen_k.add(int(decoding._sample(logits, options, g)[0]))
        # probs ~ [.03, .64, .24, .09, .01]: the smallest set with mass >= 0.8 is {1, 2}
        options = DecodingOptions(temperature=1.0, top_p=0.8)
        seen_p.add(int(decoding._sample(logits, options, g)[0]))
    assert seen_k == {1, 2}
    assert seen_p == {1, 2}


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(beam_size=0), "beam_size"),
        (dict(beam_size=2, n_best=3), "n_best"),
        (dict(n_best=0), "n_best"),
        (dict(length_penalty=math.inf), "length_penalty"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=1e-40), "temperature"),  # logits / it: inf, then NaN probabilities
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=-1), "seed"),
        (dict(beam_size=4, temperature=0.8), "beam_size"),
        (dict(stop=((),)), "stop"),
        (dict(stop=((1, -2),)), "stop"),
        (dict(beam_size=True), "beam_size"),
    ],
)
def test_invalid_options_name_the_field(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DecodingOptions(**fields)


def test_invalid_requests(translator: EncoderDecoder, lm: DecoderOnly) -> None:
    with pytest.raises(ValueError, match="empty"):
        translate(translator, [[5, 3], []], DecodingOptions())
    with pytest.raises(ValueError, match="vocab_size"):
        translate(translator, [[5, 300]], DecodingOptions())
    with pytest.raises(ValueError, match="max_positions"):
        generate(lm, [[2] * 65], DecodingOptions())
    with pytest.raises(ValueError, match="return_alignment"):
        generate(lm, PROMPTS, DecodingOptions(return_alignment=True))
    assert translate(translator, [], DecodingOptions()) == []


def test_length_is_capped_by_max_positions_per_sequence() -> None:
    """Positions past max_positions do not exist: the cap finishes with "length", and only
    for the sequence that reaches it."""
    lm = tiny("decoder-only", eos_bias=-1e4, positional="learned")
    long_prompt = [2] + [5] * 59  # 60 tokens: positions 60..63 remain, so 5 new tokens
    options = DecodingOptions(max_new_tokens=8)
    (capped,), (short,) = generate(lm, [long_prompt, PROMPTS[0]], options)
    assert capped.finish_reason == "length" and len(capped.tokens) == 5
    assert len(short.tokens) == 8
    assert decoding.new_token_limit(lm.config, 60, 8) == 5
    translator = tiny("encoder-decoder", eos_bias=-1e4)
    ((hyp,),) = translate(translator, SOURCES[:1], DecodingOptions(max_new_tokens=100))
    assert hyp.finish_reason == "length" and len(hyp.tokens) == translator.config.max_positions


def test_options_are_hashable_and_accept_lists() -> None:
    options = DecodingOptions(stop=[[4, 5], [6]])  # type: ignore[arg-type]
    assert options.stop == ((4, 5), (6,))
    assert hash(options) == hash(DecodingOptions(stop=((4, 5), (6,))))


def test_training_mode_is_restored_and_ignored() -> None:
    model = tiny("encoder-decoder", dropout=0.5)
    expected = translate(model, SOURCES, DecodingOptions(max_new_tokens=8))
    model.train()
    assert translate(model, SOURCES, DecodingOptions(max_new_tokens=8)) == expected
    assert model.training
