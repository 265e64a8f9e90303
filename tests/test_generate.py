"""``distseq generate``: the decoder's cache of keys and values, sampling, prompts and text, errors.

- the cached form equals the whole context recomputed: logits at every step, past the --seq-len crop, with
  rotary, learned and sinusoidal positions, the short convolution, the sliding window; each step within
  the context feeds one position;
- greedy is the uncached model's argmax step by step (the decoder; the models without a cache); top-k 1 is
  greedy; every draw of top-k is among the k largest; a seed gives the same tokens, another seed others;
  cached and uncached runs write the same tokens, greedy and sampled;
- the command on real checkpoints (trained a few steps): ids as JSON, text through the run's codec (--task lm
  on bytes and on a tokenizer.json), the end-of-document id, stdout equal to --output; every bad input one
  line, exit 2, no file written; non-causal models and tasks without next-token logits refused, naming them;
- the generation benchmark runs and reports its figures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from causality import model_for
from conftest import assert_ok, run_here

from distseq.bench.generation import QUICK, generation_speed
from distseq.config import ModelConfig, preset
from distseq.data.text import run_codec
from distseq.errors import ConfigError, NonFiniteError
from distseq.inference.export import model_from_checkpoint
from distseq.inference.generate import Cached, Sampling, Uncached, check_generates, generate, next_token, stepper
from distseq.models import build_model
from distseq.registry import TASKS
from distseq.tasks import TaskSpec

SEQ_LEN, VOCAB = 16, 256
SHORT = ["--seq-len", str(SEQ_LEN), "--hidden-size", "16", "--max-steps", "3", "--eval-every", "0", "--no-progress"]
TRAIN = ["train", "--preset", "induction", "--vocab-size", str(VOCAB), "--global-batch-size", "16", "--eval-size",
         "16", *SHORT]
TRAIN_LM = ["train", "--task", "lm", "--model", "decoder", "--num-heads", "2", "--global-batch-size", "4", *SHORT]
STORY = "once upon a time the fox sat on a mat.\nthe cat sat on the fox.\n"


def trained(root: Path, *options: str, command=TRAIN) -> Path:
    run = root / "run"
    assert_ok(run_here([*command, "--run-dir", str(run), *options]))
    return next((run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def decoder_checkpoint(tmp_path_factory) -> Path:
    """A decoder (rotary, short convolution) trained 3 steps on induction ids."""
    return trained(tmp_path_factory.mktemp("decoder"), "--short-conv", "3")


def text_run(root: Path, *options: str) -> Path:
    (root / "story.txt").write_text(STORY)
    return trained(root, "--data-files", str(root / "story.txt"), *options, command=TRAIN_LM)


@pytest.fixture(scope="module")
def bytes_checkpoint(tmp_path_factory) -> Path:
    """--task lm on a .txt file's bytes (byte 0 ends a document)."""
    return text_run(tmp_path_factory.mktemp("bytes"))


@pytest.fixture(scope="module")
def tokenizer_checkpoint(tmp_path_factory) -> Path:
    """--task lm on a .txt file through a word-level tokenizer.json (its <|endoftext|> ends a document)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("tokenizer")
    words = sorted(set(STORY.replace(".", " . ").split()))
    vocab = {word: i for i, word in enumerate(["[UNK]", "<|endoftext|>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(root / "tokenizer.json"))
    return text_run(root, "--tokenizer", str(root / "tokenizer.json"))


@pytest.fixture(scope="module")
def decoder(decoder_checkpoint):
    model, cfg, _ = model_from_checkpoint(decoder_checkpoint)
    return model


def edited(checkpoint: Path, to: Path, **data) -> Path:
    """A copy of ``checkpoint`` whose run's data section has ``data`` (meta.json is not among its digests)."""
    shutil.copytree(checkpoint, to)
    meta = json.loads((to / "meta.json").read_text())
    meta["config"]["data"].update(data)
    (to / "meta.json").write_text(json.dumps(meta))
    return to


def argmax_run(model, prompt, steps, context):
    """Greedy by hand: the whole context (its last ``context`` tokens) through the model, every step."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens[-context:]]))[0, -1].argmax()))
    return tokens[len(prompt):]


# --- the cache: logits -------------------------------------------------------------------------------
CACHED_MODELS = {
    "rope": ("decoder", {"positions": "rope", "num_layers": 2}),
    "learned": ("decoder", {"positions": "learned", "num_layers": 2}),
    "sinusoidal+short-conv": ("decoder", {"positions": "sinusoidal", "short_conv": 3, "num_layers": 2}),
    "rope+short-conv-tied": ("decoder", {"positions": "rope", "short_conv": 4, "tie_embeddings": True}),
    "sliding-window": ("sliding-window", {"window": 4, "short_conv": 2, "num_layers": 2}),
}


def sharp(name: str):
    """``CACHED_MODELS[name]`` at seq 8 over 12 tokens with large random weights: sharp attention, positions
    that matter (at init they barely do)."""
    kind, options = CACHED_MODELS[name]
    model = model_for(kind, "induction", TaskSpec(8, 8, 12), **options).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("name", CACHED_MODELS)
def test_cached_logits_equal_the_whole_context_past_the_crop(name):
    kind = CACHED_MODELS[name][0]
    model = sharp(name)
    tokens = torch.randint(0, 12, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    cached, uncached = Cached(model, 8), Uncached(model, 8)
    built = 0
    with torch.no_grad():
        for n in range(1, len(tokens) + 1):
            before = cached.cache
            got, want = cached(tokens[:n]), uncached(tokens[:n])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name}: logits after {n} tokens")
            assert cached.cache.length == min(n, 8)  # the positions the cache holds: the context's
            built += cached.cache is not before
    # within the context (tokens 1..8) one cache grew a token a step; past it, one rebuild per step
    assert built == 1 + (len(tokens) - 8)
    held = cached.cache.layers[0].keys.shape[2]
    assert held == (4 if kind == "sliding-window" else 8)  # a window keeps its last `window` keys only


def test_a_model_without_a_cached_form_recomputes():
    spec = TaskSpec(8, 8, 12)
    for kind, options in (("hyena", {}), ("lstm", {})):
        model = model_for(kind, "induction", spec, **options).eval()
        assert type(stepper(model, 8, cache=True)) is Uncached, kind
    assert type(stepper(model_for("decoder", "induction", spec).eval(), 8, cache=False)) is Uncached
    assert type(stepper(model_for("decoder", "induction", spec).eval(), 8, cache=True)) is Cached


# --- sampling ----------------------------------------------------------------------------------------
def test_greedy_is_the_uncached_argmax_step_by_step_past_the_context(decoder):
    prompt = [5, 9, 200]
    want = argmax_run(decoder, prompt, 2 * SEQ_LEN, SEQ_LEN)
    for cache in (True, False):
        result = generate(decoder, prompt, 2 * SEQ_LEN, Sampling(temperature=0.0), SEQ_LEN, cache=cache)
        assert result.tokens == want and result.ended == "max-new-tokens" and result.prompt == prompt


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "based", "hyena", "mamba"])
def test_the_other_causal_models_generate_greedy_without_a_cache(kind):
    spec = TaskSpec(8, 8, 12)
    model = model_for(kind, "induction", spec).eval()
    result = generate(model, [1, 2], 12, Sampling(temperature=0.0), 8)
    assert result.tokens == argmax_run(model, [1, 2], 12, 8)


def test_top_k_1_is_greedy_whatever_the_seed(decoder):
    greedy = generate(decoder, [3, 4], 20, Sampling(temperature=0.0), SEQ_LEN).tokens
    for seed in (0, 1, 2):
        assert generate(decoder, [3, 4], 20, Sampling(1.0, top_k=1, seed=seed), SEQ_LEN).tokens == greedy


def test_top_k_draws_among_the_k_most_likely_only(decoder):
    prompt, k = [3, 4], 3
    tokens = generate(decoder, prompt, 2 * SEQ_LEN, Sampling(2.0, top_k=k, seed=5), SEQ_LEN).tokens
    context = list(prompt)
    with torch.no_grad():
        for token in tokens:
            logits = decoder(torch.tensor([context[-SEQ_LEN:]]))[0, -1]
            assert token in logits.topk(k).indices.tolist()
            context.append(token)
    assert len(set(tokens)) > 1  # drawn, not the argmax every time


def test_a_tiny_temperature_is_greedy_not_a_nan(decoder):
    greedy = generate(decoder, [3, 4], 20, Sampling(temperature=0.0), SEQ_LEN).tokens
    assert generate(decoder, [3, 4], 20, Sampling(1e-30, seed=1), SEQ_LEN).tokens == greedy


def test_non_finite_logits_are_an_error_not_a_token(decoder_checkpoint):
    with pytest.raises(NonFiniteError, match="logits are not finite"):
        next_token(torch.tensor([0.5, float("nan"), 1.0]), Sampling(0.0), torch.Generator())
    model, cfg, _ = model_from_checkpoint(decoder_checkpoint)
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError):
        generate(model, [1], 3, Sampling(1.0), SEQ_LEN)


def test_a_seed_repeats_and_other_seeds_differ(decoder):
    runs = {seed: generate(decoder, [7], 24, Sampling(1.0, seed=seed), SEQ_LEN).tokens for seed in (11, 12, 13)}
    assert generate(decoder, [7], 24, Sampling(1.0, seed=11), SEQ_LEN).tokens == runs[11]
    assert len({tuple(tokens) for tokens in runs.values()}) == 3


@pytest.mark.parametrize("sampling", [Sampling(0.0), Sampling(1.0, seed=3), Sampling(0.7, top_k=20, seed=4)])
def test_cached_and_uncached_runs_write_the_same_tokens(decoder, sampling):
    for model, context in ((decoder, SEQ_LEN), (sharp("rope+short-conv-tied"), 8), (sharp("sliding-window"), 8)):
        cached = generate(model, [1, 2, 3], 2 * context + 3, sampling, context, cache=True)
        uncached = generate(model, [1, 2, 3], 2 * context + 3, sampling, context, cache=False)
        assert cached == uncached
        assert sampling.temperature == 0 or len(set(cached.tokens)) > 1  # drawn: not one token repeated


def test_generation_stops_before_the_end_of_document_id(decoder):
    free = generate(decoder, [1, 2], 10, Sampling(0.0), SEQ_LEN).tokens
    eod = free[3]
    stopped = generate(decoder, [1, 2], 10, Sampling(0.0), SEQ_LEN, eod=eod)
    assert stopped.tokens == free[:free.index(eod)] and stopped.ended == "eod"


# --- the command -------------------------------------------------------------------------------------
def run_generate(checkpoint, *options):
    return run_here(["generate", "--checkpoint", str(checkpoint), *options])


def test_command_writes_ids_as_json_the_same_to_stdout_and_output(decoder_checkpoint, decoder, tmp_path):
    options = ["--prompt-ids", "1, 2,3", "--max-new-tokens", "20", "--seed", "9", "--top-k", "5"]
    shown = run_generate(decoder_checkpoint, *options)
    assert_ok(shown)
    row = json.loads(shown.stdout)
    want = generate(decoder, [1, 2, 3], 20, Sampling(1.0, top_k=5, seed=9), SEQ_LEN)
    assert row == {"prompt": [1, 2, 3], "generated": want.tokens, "ended": "max-new-tokens"}
    out = tmp_path / "out.json"
    assert_ok(run_generate(decoder_checkpoint, *options, "--no-cache", "--output", str(out)))
    assert out.read_text() == shown.stdout


def test_command_prompt_file_of_ids(decoder_checkpoint, tmp_path):
    (tmp_path / "prompt.txt").write_text("1 2\n3\n")
    shown = run_generate(decoder_checkpoint, "--prompt-file", str(tmp_path / "prompt.txt"), "--max-new-tokens", "2")
    assert_ok(shown)
    assert json.loads(shown.stdout)["prompt"] == [1, 2, 3]


TEXT_PROMPTS = {"bytes": "the fox é", "tokenizer": "the cat sat"}


@pytest.mark.parametrize("codec", TEXT_PROMPTS)
def test_command_on_a_text_run_writes_the_prompt_and_its_continuation(codec, request, tmp_path):
    checkpoint = request.getfixturevalue(f"{codec}_checkpoint")
    model, cfg, _ = model_from_checkpoint(checkpoint)
    runs_codec, text = run_codec(cfg.data.tokenizer), TEXT_PROMPTS[codec]
    assert runs_codec.name == ("bytes" if codec == "bytes" else cfg.data.tokenizer) and cfg.data.eod_id is not None
    prompt = runs_codec.encode(text)
    for options in ([], ["--ignore-eod"]):
        shown = run_generate(checkpoint, "--prompt", text, "--max-new-tokens", "12", "--seed", "3", *options)
        assert_ok(shown)
        want = generate(model, prompt, 12, Sampling(1.0, seed=3), SEQ_LEN, eod=None if options else cfg.data.eod_id)
        assert shown.stdout == runs_codec.decode(prompt + want.tokens) + "\n"
        assert shown.stdout.startswith(text)
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "out.txt"
    assert_ok(run_generate(checkpoint, "--prompt-file", str(tmp_path / "prompt.txt"), "--max-new-tokens", "12",
                           "--seed", "3", "--ignore-eod", "--output", str(out)))
    assert out.read_text(encoding="utf-8") + "\n" == shown.stdout  # the file holds the text exactly
    ids = run_generate(checkpoint, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "12",
                       "--seed", "3", "--ignore-eod")
    assert ids.stdout == shown.stdout  # ids are accepted for a text run too; the output is still text


def test_command_stops_at_the_runs_end_of_document_id(decoder_checkpoint, decoder, tmp_path):
    free = generate(decoder, [1, 2], 10, Sampling(0.0), SEQ_LEN).tokens
    checkpoint = edited(decoder_checkpoint, tmp_path / "step", eod_id=free[4])
    stopped = json.loads(run_generate(checkpoint, "--prompt-ids", "1,2", "--temperature", "0",
                                      "--max-new-tokens", "10").stdout)
    assert stopped["generated"] == free[:free.index(free[4])] and stopped["ended"] == "eod"
    going = json.loads(run_generate(checkpoint, "--prompt-ids", "1,2", "--temperature", "0", "--max-new-tokens",
                                    "10", "--ignore-eod").stdout)
    assert going["generated"] == free and going["ended"] == "max-new-tokens"


BAD = {
    "empty ids": (["--prompt-ids", " , "], "--prompt-ids: empty: give at least one token"),
    "not an integer": (["--prompt-ids", "1,2.5"], "--prompt-ids: '2.5' is not an integer token id"),
    "outside the vocabulary": (["--prompt-ids", f"1,{VOCAB}"], f"token id {VOCAB} is outside the model's vocabulary"),
    "too long": (["--prompt-ids", ",".join(["1"] * (SEQ_LEN + 1))],
                 f"--prompt-ids: {SEQ_LEN + 1} tokens, more than the model reads ({SEQ_LEN}, its run's --seq-len)"),
    "text for ids": (["--prompt", "hello"], "--prompt: the run's data were token ids, not text"),
    "missing prompt file": (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file: cannot read"),
    "negative temperature": (["--prompt-ids", "1", "--temperature", "-0.5"], "--temperature: must be a finite"),
    "nan temperature": (["--prompt-ids", "1", "--temperature", "nan"], "--temperature: must be a finite"),
    "infinite temperature": (["--prompt-ids", "1", "--temperature", "inf"], "--temperature: must be a finite"),
    "negative seed": (["--prompt-ids", "1", "--seed", "-1"], "--seed: must be an integer in [0, "),
    "huge seed": (["--prompt-ids", "1", "--seed", str(2**64)], "--seed: must be an integer in [0, "),
    "top-k 0": (["--prompt-ids", "1", "--top-k", "0"], "--top-k: must be an integer >= 1"),
    "no new tokens": (["--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1"),
    "no prompt": ([], "one of the arguments --prompt --prompt-ids --prompt-file is required"),
}


@pytest.mark.parametrize("case", BAD)
def test_command_bad_input_is_one_line_exit_2_and_no_file(case, decoder_checkpoint, tmp_path):
    options, message = BAD[case]
    out = tmp_path / "out.json"
    proc = run_generate(decoder_checkpoint, *options, "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("distseq generate: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_command_empty_text_prompt_is_refused(bytes_checkpoint, tokenizer_checkpoint, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cases = [(bytes_checkpoint, ["--prompt", ""]), (bytes_checkpoint, ["--prompt-file", str(tmp_path / "empty.txt")]),
             (tokenizer_checkpoint, ["--prompt", "  "])]  # whitespace: no word, no token
    for checkpoint, options in cases:
        proc = run_generate(checkpoint, *options)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "empty: give at least one token" in \
            proc.stderr, proc.stderr


def test_command_text_prompt_longer_than_the_context_is_refused(bytes_checkpoint):
    proc = run_generate(bytes_checkpoint, "--prompt", "x" * (SEQ_LEN + 1))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"--prompt: {SEQ_LEN + 1} tokens, more than the model reads ({SEQ_LEN}" in proc.stderr


@pytest.mark.parametrize("where", ["missing directory", "a directory", "empty"])
def test_command_bad_output_is_one_line_exit_2(where, decoder_checkpoint, tmp_path):
    output = {"missing directory": tmp_path / "nowhere" / "out.json", "a directory": tmp_path, "empty": ""}[where]
    proc = run_generate(decoder_checkpoint, "--prompt-ids", "1", "--output", str(output))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--output: " in proc.stderr, proc.stderr
    assert not (tmp_path / "nowhere").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["missing", "no meta.json", "damaged weights"])
def test_command_bad_checkpoint_says_what_predict_says(case, decoder_checkpoint, tmp_path):
    checkpoint = tmp_path / "step"
    if case == "no meta.json":
        checkpoint.mkdir()
    elif case == "damaged weights":
        shutil.copytree(decoder_checkpoint, checkpoint)
        weights = checkpoint / "state" / "__0_0.distcp"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    out = tmp_path / "out.json"
    generated = run_generate(checkpoint, "--prompt-ids", "1", "--output", str(out))
    predicted = run_here(["predict", "--checkpoint", str(checkpoint), "--random", "1"])
    assert generated.returncode == predicted.returncode == 2
    assert generated.stderr.count("\n") == 1 and generated.stderr.startswith("distseq generate: error: ")
    assert generated.stderr.removeprefix("distseq generate") == predicted.stderr.removeprefix("distseq predict")
    assert not out.exists()


def test_command_refuses_a_non_causal_model_naming_it(tmp_path):
    checkpoint = trained(tmp_path, "--model", "transformer", "--hidden-size", "8", "--max-steps", "1")
    proc = run_generate(checkpoint, "--prompt-ids", "1,2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--checkpoint: its --model transformer is not causal" in proc.stderr and "the decoder" in proc.stderr


@pytest.mark.parametrize("kind, task, bidirectional, message", [
    ("lstm", "induction", True, "its --model lstm is not causal"),
    ("decoder", "sum-sign", False, "its --task sum-sign has no per-step logits over a token vocabulary"),
    ("lstm", "copy", False, "its --task copy has no per-step logits over a token vocabulary"),
])
def test_models_and_tasks_that_cannot_generate(kind, task, bidirectional, message):
    cfg = preset("induction")
    cfg.data.task = task
    cfg.model = ModelConfig(kind=kind, hidden_size=8, options={"bidirectional": True} if bidirectional else {})
    if kind == "decoder":
        cfg.model.num_heads = 2
    model = build_model(cfg.model, TASKS[task], cfg.task_spec())
    with pytest.raises(ConfigError, match=message):
        check_generates(model, cfg)


def test_help_explains_every_option():
    proc = run_here(["generate", "--help"])
    assert proc.returncode == 0
    for option in ("--checkpoint", "--prompt ", "--prompt-ids", "--prompt-file", "--max-new-tokens", "--temperature",
                   "--top-k", "--seed", "--ignore-eod", "--no-cache", "--output", "--import"):
        assert option in proc.stdout, option


# --- the benchmark -----------------------------------------------------------------------------------
def test_generation_speed_reports_both_paths(decoder_checkpoint):
    figures = generation_speed(**QUICK)
    assert figures["cached_tokens_per_s"] > 0 and figures["uncached_tokens_per_s"] > 0
    assert figures["cache_speedup"] == pytest.approx(figures["cached_tokens_per_s"] / figures["uncached_tokens_per_s"])
    assert figures["same_tokens"] is True and figures["new_tokens"] == QUICK["new_tokens"]
    loaded = generation_speed(checkpoint=decoder_checkpoint, prompt_len=2, new_tokens=8, rounds=1)
    assert loaded["seq_len"] == SEQ_LEN and loaded["vocab"] == VOCAB and loaded["same_tokens"] is True
    with pytest.raises(ValueError, match="must fit seq_len"):
        generation_speed(**{**QUICK, "new_tokens": QUICK["seq_len"]})
