"""The ``dsmoe-jax`` command line.

    dsmoe-jax prepare-data corpus/*.jsonl.zst --out data/web [--tokenizer tokenizer.json]  # token shards
    dsmoe-jax train --config tiny --set train.steps=50 --workdir runs/tiny    # minutes on a CPU
    dsmoe-jax train --config tiny --workdir runs/tiny --resume                # continue that run
    dsmoe-jax train --config tiny --set mesh.expert=... --coordinator 127.0.0.1:7777 --num-processes 2 \
        --process-id 0                     # one of several processes (train/launch_local.sh starts them)
    dsmoe-jax eval --checkpoint runs/tiny                                     # loss and perplexity
    dsmoe-jax eval --checkpoint ckpt/16b --tasks hellaswag,piqa --limit 100   # lm-evaluation-harness
    dsmoe-jax generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 64
    dsmoe-jax generate --checkpoint runs/tiny-v3-mtp --prompt "def " --temperature 0 --speculative mtp
    dsmoe-jax generate --checkpoint runs/sft --prompt "What is MoE?" --chat   # one user turn, the chat template
    dsmoe-jax chat --checkpoint runs/sft --system "Be brief."   # a conversation; one turn per line when piped
    dsmoe-jax info --config 16b                       # architecture, parameters, FLOPs per token
    dsmoe-jax plan --config 16b --mesh data=8,expert=8 --batch 64 --seq 4096   # memory per device
    dsmoe-jax convert hf-to-jax deepseek-moe-16b-base ckpt/16b --dtype bfloat16
    dsmoe-jax convert jax-to-hf ckpt/16b hf-out       # sharded safetensors + index + config.json
    dsmoe-jax convert hf-to-jax DeepSeek-V3 ckpt/v3 --keep-fp8   # serve the FP8 weights as they are
    dsmoe-jax convert merge-adapter ckpt/16b merged --adapter runs/esft-task/adapter   # base + adapter
    dsmoe-jax experiment architectures --scale toy --seeds 0   # the paper's Table 1 in seconds
    dsmoe-jax experiment architectures --scale paper --dry-run --mesh fsdp=8,expert=8   # arms, params, plan
    dsmoe-jax esft-score --checkpoint runs/tiny --data data/chat --out runs/esft   # experts a task uses
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import signal
import sys

import jax
import jax.numpy as jnp

from dsmoe_jax import chat_session, convert, data, inference, prepare, runtime
from dsmoe_jax import plan as plan_lib
from dsmoe_jax.attention import resolve_implementation
from dsmoe_jax.config import Config, load_config
from dsmoe_jax.costs import cache_bytes_per_token, count_params, flops_per_token
from dsmoe_jax.errors import ConfigError, DsmoeError, InputError, drop_second_hand_reports, storage_error
from dsmoe_jax.evaluation import evaluate
from dsmoe_jax.grouped import resolve_backend
from dsmoe_jax.loading import load_model
from dsmoe_jax.peft import adapter as peft_adapter
from dsmoe_jax.peft import esft
from dsmoe_jax.train.distributed import initialize_distributed
from dsmoe_jax.train.loop import train

COMPILING = ("train", "eval", "generate", "chat", "experiment", "esft-score")  # the commands that jit a model


def run_paths(cfg: Config) -> str:
    """Which implementations a run of ``cfg`` takes on this machine's JAX backend."""
    m, platform = cfg.model, jax.default_backend()
    parts = [f"attention {resolve_implementation(m.attention, dtype=m.dtype)} (xla over a KV cache)"]
    if m.moe is not None and m.n_moe_layers:
        parts.insert(0, f"grouped MLP backend {'tiled_fp8' if m.fp8 else resolve_backend(m.moe.backend)}")
    return f"on {platform:<10}{', '.join(parts)}"


def summary(cfg: Config, seq_len: int | None = None, experts_per_token: float | None = None) -> dict:
    """The numbers of ``describe`` as one record (``--json``); top-p routing's counts are at its
    cap, and with ``experts_per_token`` (a measured mean) also at that mean."""
    m = cfg.model
    seq_len = seq_len or cfg.train.seq_len
    total, activated = count_params(m)
    out = {"params_total": total, "params_activated": activated, "seq_len": seq_len,
           "flops_per_token_forward": flops_per_token(m, seq_len),
           "kv_cache_bytes_per_token": cache_bytes_per_token(m), "n_layers": m.n_layers,
           "n_moe_layers": m.n_moe_layers, "d_model": m.d_model, "vocab_size": m.vocab_size}
    if experts_per_token is not None:
        if m.moe is None or m.moe.routing != "top_p" or not 1 <= experts_per_token <= m.moe.slots:
            raise ConfigError(f"--experts-per-token {experts_per_token:g}: a mean between 1 and the cap of top-p "
                              "routing (moe.max_experts); other routings take a fixed number")
        out.update(experts_per_token=experts_per_token,
                   params_activated_expected=count_params(m, experts_per_token)[1],
                   flops_per_token_forward_expected=flops_per_token(m, seq_len, experts_per_token))
    return out


def _experts_per_token(moe) -> str:
    if moe.routing == "top_p":
        return f"top-p {moe.threshold:g} (at most {moe.slots})"
    return f"top-{moe.top_k} ({moe.routing} routing)"


def describe(cfg: Config, seq_len: int | None = None, experts_per_token: float | None = None) -> str:
    """A short human-readable summary of ``cfg``'s architecture and size (``summary``'s numbers)."""
    m, n = cfg.model, summary(cfg, seq_len, experts_per_token)
    fwd = n["flops_per_token_forward"]
    lines = [
        f"layers        {m.n_layers} ({m.n_dense_layers} dense, {m.n_moe_layers} MoE), d_model {m.d_model}",
        f"attention     {m.n_heads} heads x {m.head_dim} ({m.kv_heads} kv heads), RoPE theta {m.rope_theta:g}"
        if m.mla is None else
        f"attention     MLA, {m.n_heads} heads: q/k {m.mla.qk_nope_head_dim} + rope {m.mla.qk_rope_head_dim}, v "
        f"{m.mla.v_head_dim}; latents q {m.mla.q_lora_rank or 'none'}, kv {m.mla.kv_lora_rank}; RoPE theta "
        f"{m.rope_theta:g}" + (f", YaRN x{m.yarn.factor:g}" if m.yarn else ""),
        f"dense FFN     {m.d_ff}",
    ]
    if m.moe is not None and m.n_moe_layers:
        e = m.moe
        lines.append(
            f"MoE           {e.n_shared_experts} shared + {e.n_routed_experts} routed experts of width "
            f"{e.expert_d_ff}, {_experts_per_token(e)}, backend {e.backend}"
        )
    bound = "at most " if m.moe is not None and m.moe.routing == "top_p" else ""  # top-p: at its cap
    lines += [
        f"vocabulary    {m.vocab_size}, untied LM head; params {m.param_dtype}, compute {m.dtype}"
        + ("; projections and experts held in FP8 (e4m3, 128x128 block scales)" if m.fp8_weights else "")
        + ("; FP8 GEMMs (e4m3, 1x128 and 128x128 scales)" if m.fp8 else ""),
        f"parameters    {n['params_total']:,} total, {bound}{n['params_activated']:,} activated per token",
        f"FLOPs/token   {bound}{fwd / 1e9:.3f} GFLOP forward, {3 * fwd / 1e9:.3f} GFLOP train step "
        f"(seq {n['seq_len']})",
        f"KV cache      {n['kv_cache_bytes_per_token'] / 1024:.1f} KiB per token, all layers, in {m.dtype}",
    ]
    if experts_per_token is not None:
        expected = n["flops_per_token_forward_expected"]
        lines.insert(-1, f"expected      {n['params_activated_expected']:,} activated per token, {expected / 1e9:.3f} "
                         f"GFLOP forward, at {experts_per_token:g} routed experts per token")
    return "\n".join(lines)


def _print(args, text: str, record: dict) -> None:
    """The command's result: text for people, or with ``--json`` one JSON object for scripts."""
    print(json.dumps(record) if args.json else text)


def _info(args) -> None:
    cfg = load_config(args.config, args.set)
    _print(args, f"{describe(cfg, None, args.experts_per_token)}\n{run_paths(cfg)}",
           {**summary(cfg, None, args.experts_per_token), "platform": jax.default_backend()})


def _workdir(args) -> str:
    """``train``'s workdir: ``--workdir``, or ``runs/<config>``."""
    return args.workdir or f"runs/{pathlib.Path(args.config).stem}"


def _train(args) -> None:
    cfg = load_config(args.config, args.set)
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
    if jax.process_index() != 0:
        args.quiet = True
    workdir = _workdir(args)
    if not args.quiet:
        print(describe(cfg), f"\nworkdir       {workdir}", flush=True)
    last = train(cfg, workdir, resume=args.resume, progress=not args.quiet)
    if last is not None and last.val_loss is not None and not args.quiet:
        print(f"final: loss {last.loss:.4f}, validation loss {last.val_loss:.4f}")


def _prepare_data(args) -> None:
    options = prepare.Options(tokenizer=args.tokenizer, text_field=args.text_field, val_every=args.val_every,
                              shard_tokens=args.shard_tokens, on_error=args.on_error, format=args.format)
    m = prepare.prepare(args.inputs, args.out, options, workers=args.workers, progress=not args.quiet)
    skipped = f", {m.skipped} bad records skipped (listed in manifest.json)" if m.skipped else ""
    print(f"wrote {args.out}: {len(m.shards)} shards of {m.dtype} tokens; train {m.train.tokens:,} tokens in "
          f"{m.train.documents:,} documents, validation {m.val.tokens:,} in {m.val.documents:,}{skipped}")
    if m.record_format == "chat":
        print(f"chat examples: train {m.train.documents:,} with {m.train.answer_tokens:,} answer tokens (the loss "
              f"mask), validation {m.val.documents:,} with {m.val.answer_tokens:,}; the longest "
              f"{max(m.train.longest, m.val.longest):,} tokens")
        from dsmoe_jax.packing import efficiency
        from dsmoe_jax.shards import load_examples
        from dsmoe_jax.tokenizer import load_tokenizer

        lengths = load_examples(args.out, load_tokenizer(args.tokenizer), args.tokenizer)[0].lengths()
        if len(lengths):
            row = args.seq_len + 1
            print(f"packed into rows of train.seq_len + 1 = {row} tokens: {efficiency(lengths, row):.1%} of the row "
                  f"tokens are real; {int((lengths > row).sum()):,} examples longer than a row would be cut")


def _load(args, tokenizer: str | None = None):
    """The model of ``--checkpoint``, with ``--adapter`` applied when given (ESFT or LoRA)."""
    model = load_model(args.checkpoint, tokenizer=tokenizer)
    if args.adapter:
        model = model._replace(params=peft_adapter.apply_adapter(model.params, model.cfg, args.adapter))
    return model


def _add_adapter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", metavar="DIR", help="apply a fine-tuned adapter to the checkpoint: an ESFT "
                                                         "adapter (expert_cfg.json and the trained experts) or a "
                                                         "LoRA adapter in PEFT's format (adapter_config.json)")


def _eval(args) -> None:
    if args.tasks is not None and args.adapter:
        raise ConfigError("--adapter with --tasks: write the merged model first (dsmoe-jax convert merge-adapter "
                          "BASE OUT --adapter DIR) and evaluate that")
    if args.tasks is not None:
        _eval_tasks(args)
        return
    if args.tokens is not None and args.tokens < 1:
        raise ConfigError(f"--tokens {args.tokens}: must be >= 1 (leave it out to evaluate all the tokens)")
    task_only = [flag for flag, value in (("--limit", args.limit), ("--include-path", args.include_path),
                                          ("--num-fewshot", args.num_fewshot), ("--output", args.output),
                                          ("--no-builtin-tasks", args.no_builtin_tasks),
                                          ("--allow-code-execution", args.allow_code_execution)) if value]
    if task_only:
        raise ConfigError(f"{', '.join(task_only)}: only with --tasks (lm-evaluation-harness tasks)")
    params, cfg, _ = _load(args)  # its tokenizer: the one the loss is taken in
    if args.data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=args.data))
    if args.seq_len is not None:
        if not 1 <= args.seq_len <= cfg.model.max_seq_len:
            raise ConfigError(f"--seq-len {args.seq_len}: must be between 1 and model.max_seq_len "
                              f"{cfg.model.max_seq_len}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=args.seq_len))
    train_tokens, val_tokens, _ = data.load_tokens(cfg, checkpoint=args.checkpoint)
    # Your own --data is evaluated whole; otherwise the run's validation sample (train.eval_tokens).
    tokens = data.join_splits(train_tokens, val_tokens) if args.data else val_tokens
    max_tokens = args.tokens if args.tokens is not None else (0 if args.data else None)
    result = evaluate(params, cfg, tokens, max_tokens=max_tokens)
    record = {"loss": result.loss, "stderr": result.stderr, "perplexity": result.perplexity, "tokens": result.tokens,
              "windows": result.windows, "seq_len": cfg.train.seq_len}
    text = (f"loss {result.loss:.4f} +- {result.stderr:.4f} (standard error)  perplexity {result.perplexity:.2f}  "
            f"({result.tokens:,} tokens in {result.windows} windows of {cfg.train.seq_len})")
    if cfg.model.moe is not None and cfg.model.moe.routing == "top_p":  # top-k: always K
        record["active_experts"] = list(result.active_experts)
        text += "\nrouted experts per token by MoE layer: " + " ".join(f"{a:.2f}" for a in result.active_experts)
    _print(args, text, record)


def _eval_tasks(args) -> None:
    """``eval --tasks``: lm-evaluation-harness tasks through ``harness.evaluate_tasks``."""
    from dsmoe_jax import harness

    if args.data or args.tokens is not None:
        raise ConfigError("--data and --tokens are for the loss evaluation; with --tasks the tasks bring their data")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"--tasks {args.tasks!r} names no task: e.g. --tasks hellaswag,piqa (leave --tasks out "
                          "for the loss evaluation)")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = harness.evaluate_tasks(args.checkpoint, tasks, limit=limit, batch_size=args.batch_size,
                                     include_path=args.include_path, include_builtin=not args.no_builtin_tasks,
                                     num_fewshot=args.num_fewshot,
                                     allow_code_execution=args.allow_code_execution)
    record = {k: results[k] for k in ("results", "groups", "configs", "versions", "n-shot") if k in results}
    print(json.dumps(record, default=str) if args.json else harness.format_results(results))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(record, indent=2, default=str))


def _generate(args) -> None:
    if args.system is not None and not args.chat:
        raise ConfigError("--system: only with --chat (the system prompt of a chat-formatted prompt)")
    if args.chat and args.speculative:
        raise ConfigError("--chat with --speculative is not supported: leave one of them out")
    model = _load(args)
    if args.chat:
        _generate_chat(args, model)
        return
    params, cfg, tok = model
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + [int(i) for i in tok.encode(args.prompt)]
    if args.speculative:
        _generate_speculative(args, params, cfg, tok, ids)
        return
    # stream checks the prompt and the sampling options when called: before anything is printed
    tokens = inference.stream(params, ids, cfg, args.max_new_tokens, jax.random.key(args.seed), args.temperature,
                              args.top_k, args.top_p, eos=tok.eos_id)
    print(args.prompt, end="", flush=True)
    text = chat_session.TextStream(tok)  # a token may end inside a character: it is printed when whole
    for token in tokens:
        print(text.push(token), end="", flush=True)
    print(text.flush())


def _generate_chat(args, model) -> None:
    """``generate --chat``: the prompt as one user turn in the chat format; the answer alone is printed."""
    session = chat_session.ChatSession(model, args.system, args.max_new_tokens, args.temperature, args.top_k,
                                       args.top_p, args.seed)
    reply = session.reply(args.prompt)
    print()
    if reply.interrupted:  # as plain generate: Ctrl-C stops the command
        raise KeyboardInterrupt


def _chat(args) -> None:
    model = _load(args, tokenizer=args.tokenizer)
    chat_session.run(chat_session.ChatSession(model, args.system, args.max_new_tokens, args.temperature,
                                              args.top_k, args.top_p, args.seed))


def _generate_speculative(args, params, cfg, tok, ids) -> None:
    """Greedy decoding with the MTP module drafting: all on device, then the text and the drafts'
    acceptance (on stderr)."""
    if args.temperature != 0:
        raise InputError(f"--speculative {args.speculative} decodes greedily; add --temperature 0 (got "
                         f"{args.temperature})")
    sampling = [f"{flag} {value}" for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p))
                if value is not None]
    if sampling:
        raise InputError(f"--speculative {args.speculative} decodes greedily, so {' and '.join(sampling)} would be "
                         "ignored; leave them out")
    fn = jax.jit(inference.generate_speculative, static_argnames=("cfg", "max_new_tokens", "eos"))
    out, stats = fn(params, jnp.asarray([ids], jnp.int32), cfg.model, args.max_new_tokens, eos=tok.eos_id)
    new = [int(t) for t in out[0, :int(stats.tokens_B[0])] if int(t) != tok.eos_id]
    print(args.prompt + tok.decode(new))
    print(f"speculative ({args.speculative}): {int(stats.tokens_B[0])} tokens in {int(stats.steps) + 1} passes of "
          f"the model, {int(stats.accepted_B[0])} of {int(stats.drafted_B[0])} drafts accepted "
          f"({stats.acceptance:.0%}), {stats.tokens_per_step:.2f} tokens per pass", file=sys.stderr)


def _convert(args) -> None:
    if (args.direction == "merge-adapter") != bool(args.adapter):
        raise ConfigError("merge-adapter needs --adapter DIR, and --adapter is for merge-adapter only")
    if args.direction == "merge-adapter":
        peft_adapter.merge_adapter(args.source, args.adapter, args.out)
        print(f"wrote {args.out}: {args.source} with the adapter {args.adapter} applied")
        return
    if args.keep_fp8 and args.direction != "hf-to-jax" or args.quantize and args.direction != "jax-to-hf":
        raise ConfigError("--keep-fp8 is for hf-to-jax and --quantize for jax-to-hf")
    if args.direction == "hf-to-jax":
        cfg = convert.hf_to_jax(args.source, args.out, dtype=args.dtype, drop_mtp=args.drop_mtp,
                                keep_fp8=args.keep_fp8)
        fp8 = ", projections and experts in FP8 (e4m3, 128x128 block scales)" if cfg.model.fp8_weights else ""
        print(f"wrote {args.out}: {count_params(cfg.model)[0]:,} parameters in {cfg.model.param_dtype}{fp8}")
    else:
        convert.jax_to_hf(args.source, args.out, step=args.step, max_shard_bytes=int(args.max_shard_gb * 1e9),
                          quantize=args.quantize)
        print(f"wrote {args.out}")


def _parse_mesh(text: str) -> dict[str, int]:
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ConfigError(f"--mesh {text!r}: expected AXIS=SIZE pairs such as data=8,expert=8") from None


def _plan(args) -> None:
    cfg = load_config(args.config, args.set)
    p = plan_lib.make_plan(cfg, _parse_mesh(args.mesh), batch=args.batch, seq=args.seq, platform=args.platform)
    record = {**summary(cfg, args.seq, args.experts_per_token), **dataclasses.asdict(p), "devices": p.devices,
              "bytes_per_device": p.total(remat=False), "bytes_per_device_remat": p.total(remat=True)}
    _print(args, f"{describe(cfg, args.seq, args.experts_per_token)}\n"
                 f"{plan_lib.format_plan(p, args.gpu_memory, args.peak_tflops)}", record)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"--seeds {text!r} repeats seed {repeated[0]}: each seed is one run, and a repeat "
                          "would count the same run twice in the spread")
    return seeds


def _experiment(args) -> None:
    from dsmoe_jax import experiments

    # the whole plan is checked, in a dry run too: it must refuse what a run refuses
    listed = lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None
    seeds, variants, arms = _parse_seeds(args.seeds), listed(args.variants), listed(args.arms)
    plan = experiments.plan(args.name, args.scale, seeds, variants, arms)
    if args.mesh and not args.dry_run:
        raise ConfigError("--mesh plans the arms on a device mesh and needs --dry-run; a run trains on this "
                          "machine's devices")
    if not args.dry_run:
        experiments.run_study(args.name, args.scale, seeds, variants, arms, args.workdir, resume=args.resume,
                              progress=not args.quiet)
        return
    mesh = _parse_mesh(args.mesh) if args.mesh else None  # a malformed --mesh is one error, not one per arm
    for row in experiments.describe(plan):
        settings = " ".join(f"{k}={v}" for k, v in row["settings"].items())
        moe = row["config"].model.moe
        cap = " at most" if moe is not None and moe.routing == "top_p" else ""  # top-p: at its cap
        print(f"{row['arm']:<17} {row['structure']:<36} {row['params_total']:>15,} total "
              f"{row['params_activated']:>15,} activated{cap}   {settings}")
        if mesh:
            try:
                planned = plan_lib.format_plan(plan_lib.make_plan(row["config"], mesh), 80)
            except ConfigError as e:  # e.g. 63 routed experts on an expert axis of 8
                planned = f"cannot run on this mesh: {e}"
            print("    " + planned.replace("\n", "\n    "))


def _configured() -> argparse.ArgumentParser:
    """--config and --set, shared by the commands that build a model from a config."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", required=True, help="TOML file or shipped config name (tiny, 2b, 16b, ...)")
    parent.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key")
    return parent


def _expected_experts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts-per-token", type=float, metavar="N",
                        help="top-p routing: the mean routed experts per token (dsmoe-jax eval prints it per layer), "
                             "for the expected parameters and FLOPs beside those at the cap")


def _structured() -> argparse.ArgumentParser:
    """--json, shared by the commands whose result a script may read."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parent


def _add_info(sub) -> None:
    info = sub.add_parser("info", parents=[_configured(), _structured()],
                          help="print a config's architecture, parameter counts and FLOPs")
    _expected_experts(info)
    info.set_defaults(run=_info)


def _add_prepare_data(sub) -> None:
    prep = sub.add_parser("prepare-data", help="tokenize text (.txt, .jsonl[.gz|.zst], .parquet) into token shards "
                                               "for data.path / data.mix")
    prep.add_argument("inputs", nargs="+", help="files, directories (searched recursively) or globs")
    prep.add_argument("--out", required=True, help="the dataset directory; rerun the same command to resume it")
    prep.add_argument("--tokenizer", default="byte", help="'byte' (default) or an HF tokenizer.json (or its folder)")
    prep.add_argument("--text-field", default="text", help="JSON key / Parquet column of the text (default text)")
    prep.add_argument("--format", choices=prepare.FORMATS, default="text",
                      help="text: documents (default); chat: JSON Lines of conversations ('messages', or 'prompt' "
                           "and 'completion'), one example each in the tokenizer's chat format, with a loss mask "
                           "on the answers")
    prep.add_argument("--seq-len", type=int, default=4095, metavar="N",
                      help="chat data: report the packing efficiency into rows of N + 1 tokens, as train.seq_len = N "
                           "packs them (default 4095: the paper's 4K rows)")
    prep.add_argument("--val-every", type=int, default=data.VAL_EVERY, metavar="N",
                      help=f"hold out every N-th record for validation (default {data.VAL_EVERY}; 0: none; 1: all, "
                           "for a validation-only set)")
    prep.add_argument("--shard-tokens", type=int, default=prepare.Options.shard_tokens, metavar="N",
                      help=f"tokens per shard (default {prepare.Options.shard_tokens:,})")
    prep.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                      help="a bad record: stop naming it (default), or skip it and count it in the manifest")
    prep.add_argument("--workers", type=int,
                      help="tokenizing processes (default: one per core; 1 for the byte tokenizer, whose tokenizing "
                           "is cheaper than sending text to workers)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(run=_prepare_data)


def _add_train(sub) -> None:
    tr = sub.add_parser("train", parents=[_configured()],
                        help="train a model; the embedded corpus unless data.path is set")
    tr.add_argument("--workdir", help="metrics, TensorBoard events and checkpoints (default runs/<config>)")
    tr.add_argument("--resume", action="store_true", help="continue from the workdir's latest checkpoint")
    tr.add_argument("--quiet", action="store_true", help="no progress bar or summary (processes > 0 are quiet)")
    multi = tr.add_argument_group("multi-process (SLURM / Open MPI jobs are detected without these)")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    multi.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                       help="fail the run when a process is silent this many seconds")
    tr.set_defaults(run=_train)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", parents=[_structured()],
                        help="loss and perplexity of a checkpoint, or lm-eval benchmarks (--tasks)")
    ev.add_argument("--checkpoint", required=True, help="a training workdir or a converted checkpoint directory")
    _add_adapter(ev)
    ev.add_argument("--data", help="text file(s), .npy tokens or a prepare-data output (chat data: the masked "
                                   "answer loss) to evaluate (default: the run's validation split)")
    ev.add_argument("--seq-len", type=int, metavar="N",
                    help="windows (packed rows) of N + 1 tokens (default: the run's train.seq_len)")
    ev.add_argument("--tokens", type=int, metavar="N",
                    help="read N tokens spread evenly over the data; 0 = all (default: the run's train.eval_tokens "
                         "for its validation split, all of --data)")
    lm = ev.add_argument_group("lm-evaluation-harness tasks (needs the eval extra: pip install -e \".[eval]\")")
    lm.add_argument("--tasks", metavar="T1,T2", help="lm-eval task or group names, e.g. hellaswag,piqa,arc_easy")
    lm.add_argument("--limit", type=float, metavar="N", help="at most N documents per task (a fraction if < 1)")
    lm.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default 8)")
    lm.add_argument("--include-path", action="append", metavar="DIR", help="a directory of your own task YAMLs")
    lm.add_argument("--no-builtin-tasks", action="store_true",
                    help="only the --include-path tasks (skips indexing lm-eval's 15,000 task files, ~15 s)")
    lm.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples (default: each task's own)")
    lm.add_argument("--allow-code-execution", action="store_true",
                    help="let code tasks (humaneval, mbpp) run the generated code: do it in a sandbox")
    lm.add_argument("--output", metavar="FILE", help="also write the results as JSON")
    ev.set_defaults(run=_eval)


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    """The sampling options ``generate`` and ``chat`` share (after their own --max-new-tokens)."""
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt, printing tokens as they come")
    gen.add_argument("--checkpoint", required=True, help="a training workdir or a converted checkpoint directory")
    _add_adapter(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    _add_sampling(gen)
    gen.add_argument("--speculative", choices=["mtp"],
                     help="greedy decoding (with --temperature 0) where the model's multi-token-prediction module "
                          "drafts a token per step (model.mtp_depth >= 1); prints the drafts' acceptance")
    gen.add_argument("--chat", action="store_true",
                     help="the prompt is a user turn in the tokenizer's chat format; print the answer alone, up to "
                          "the end-of-sentence token")
    gen.add_argument("--system", help="with --chat: a system prompt before the user turn")
    gen.set_defaults(run=_generate)


def _add_chat(sub) -> None:
    ch = sub.add_parser("chat", help="a conversation with a (fine-tuned) model in its chat format; one user turn "
                                     "per line when standard input is not a terminal")
    ch.add_argument("--checkpoint", required=True, help="a training workdir or a converted checkpoint directory")
    _add_adapter(ch)
    ch.add_argument("--system", help="a system prompt, kept when old turns are dropped")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer (default 256)")
    _add_sampling(ch)
    ch.add_argument("--tokenizer", help="a tokenizer.json (or its folder) with the chat template, if not the "
                                        "checkpoint's")
    ch.set_defaults(run=_chat)


def _add_plan(sub) -> None:
    pl = sub.add_parser("plan", parents=[_configured(), _structured()],
                        help="per-device memory, FLOPs and all_to_all traffic of a training step")
    pl.add_argument("--mesh", required=True, metavar="AXIS=SIZE,...", help="e.g. data=8,expert=8 (fsdp too)")
    pl.add_argument("--batch", type=int, help="global batch in sequences (default train.batch_size)")
    pl.add_argument("--seq", type=int, help="sequence length (default train.seq_len)")
    pl.add_argument("--platform", choices=("gpu", "cpu"), default="gpu",
                    help="the devices of the mesh: they decide the attention implementation (default gpu)")
    pl.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory per device (H100: 80)")
    pl.add_argument("--peak-tflops", type=float, default=plan_lib.DEFAULT_PEAK_TFLOPS,
                    help=f"dense bf16 TFLOP/s per device (default: H100, {plan_lib.DEFAULT_PEAK_TFLOPS:g})")
    _expected_experts(pl)
    pl.set_defaults(run=_plan)


def _add_convert(sub) -> None:
    conv = sub.add_parser("convert", help="HF DeepSeek checkpoint (v1, V2, V3) <-> dsmoe-jax checkpoint, streaming")
    conv.add_argument("direction", choices=["hf-to-jax", "jax-to-hf", "merge-adapter"])
    conv.add_argument("source", help="HF checkpoint directory (hf-to-jax), or a dsmoe-jax checkpoint directory "
                                     "or training workdir (jax-to-hf; merge-adapter: the base model)")
    conv.add_argument("--adapter", metavar="DIR", help="merge-adapter: the adapter to merge into the base model")
    conv.add_argument("out", help="output directory; must not exist yet (it appears only when complete)")
    conv.add_argument("--dtype", choices=["float32", "bfloat16"],
                      help="hf-to-jax: parameter dtype (default: the checkpoint's torch_dtype)")
    conv.add_argument("--drop-mtp", action="store_true",
                      help="hf-to-jax: leave out DeepSeek-V3's multi-token-prediction layers (model.mtp_depth = 0)")
    conv.add_argument("--keep-fp8", action="store_true",
                      help="hf-to-jax: keep an FP8 checkpoint's weights in FP8 with their block scales "
                           "(model.fp8_weights: for serving; DeepSeek-V3/R1 in one byte per weight)")
    conv.add_argument("--quantize", choices=["fp8"],
                      help="jax-to-hf: write the projection and expert matrices in FP8 (e4m3, one scale per "
                           "128x128 block: block amax / 448), as DeepSeek-V3 ships")
    conv.add_argument("--step", type=int, help="jax-to-hf: a training workdir's step (default: latest)")
    conv.add_argument("--max-shard-gb", type=float, default=2.0, help="jax-to-hf: safetensors shard size")
    conv.set_defaults(run=_convert)


def _add_experiment(sub) -> None:
    ex = sub.add_parser("experiment", help="the paper's experiments: train every arm and seed, evaluate, report")
    ex.add_argument("name", help="architectures | ablation | shared-ratio | specialisation | balance | sensitivity | "
                                 "probes | finetune (the studies of dsmoe_jax/experiments/studies.py)")
    ex.add_argument("--variants", metavar="V1,V2",
                    help="sensitivity and probes: which changes of the setting (sensitivity's default: every one of "
                         "specs.VARIANTS that applies at the scale, e.g. norm_topk, depth_4, lr_1e-3, bpe_8k); join "
                         "changes with '+' to combine them (norm_topk+lr_1e-3)")
    ex.add_argument("--arms", metavar="A1,A2",
                    help="sensitivity and probes: further arms (e.g. switch) trained and compared with GShard beside "
                         "the pair compared, gshard and deepseekmoe")
    ex.add_argument("--scale", default="cpu", choices=["toy", "cpu", "cpu-long", "paper"],
                    help="toy: seconds (tests); cpu: under an hour on 2 cores; cpu-long: 10x the tokens, hours; "
                         "paper: the 2B setup (GPU mesh)")
    ex.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ex.add_argument("--workdir", help="trained arms and results (default runs/experiments/<scale>)")
    ex.add_argument("--resume", action="store_true", help="continue unfinished arms from their last checkpoint")
    ex.add_argument("--quiet", action="store_true", help="no progress output")
    ex.add_argument("--dry-run", action="store_true",
                    help="check every choice, print each run's settings and parameter counts; train nothing")
    ex.add_argument("--mesh", metavar="AXIS=SIZE,...", help="with --dry-run: plan every arm on this mesh")
    ex.set_defaults(run=_experiment)


def _esft_score(args) -> None:
    chosen = esft.score_task(args.checkpoint, args.data, args.out, tokens=args.tokens, score=args.score,
                             top_p=args.top_p)
    trained = sum(len(ids) for ids in chosen.experts.values())
    print(f"wrote {args.out}/scores.json, relevance.png and {esft.EXPERT_CFG}: {trained} routed experts over "
          f"{len(chosen.experts)} MoE layers ({args.score} scores); train them with --set "
          f"train.trainable='esft:{args.out}/{esft.EXPERT_CFG}'")


def _add_esft_score(sub) -> None:
    es = sub.add_parser("esft-score", help="ESFT: each routed expert's relevance to a task, and the experts to train")
    es.add_argument("--checkpoint", required=True, help="the model to fine-tune (converted checkpoint or workdir)")
    es.add_argument("--data", required=True, help="the task's data: anything data.path takes (chat data: its answer "
                                                   "tokens are scored)")
    es.add_argument("--out", required=True, help="directory for scores.json, relevance.png and expert_cfg.json")
    es.add_argument("--tokens", type=int, default=131_072, help="tokens to score (default 131072, as DeepSeek's)")
    es.add_argument("--score", choices=esft.SCORES, default="token",
                    help="ESFT-Gate (mean gate) or ESFT-Token (share of selections); default token")
    es.add_argument("--top-p", type=float, help="each layer's share of relevance the chosen experts reach (default: "
                                                "the paper's, 0.1 for gate, 0.2 for token)")
    es.set_defaults(run=_esft_score)


COMMANDS = (_add_info, _add_prepare_data, _add_train, _add_eval, _add_generate, _add_chat, _add_plan, _add_convert,
            _add_esft_score, _add_experiment)  # in the order ``dsmoe-jax --help`` lists them
# the option that chooses each command's output: named by the one line of an OSError
OUTPUTS = {"prepare-data": "--out", "train": "--workdir", "experiment": "--workdir", "convert": "OUT",
           "eval": "--output", "esft-score": "--out"}


def build_parser() -> argparse.ArgumentParser:
    """``dsmoe-jax``'s parser: the global options, then each command's (``COMMANDS``)."""
    parser = argparse.ArgumentParser(prog="dsmoe-jax", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not keep compiled XLA programs on disk for later runs (runtime.py)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _output_path(args) -> str | None:
    """The path the command writes its result to, if it has one (``OUTPUTS``)."""
    if args.command == "train":
        return _workdir(args)
    return next((getattr(args, k) for k in ("out", "workdir", "output") if getattr(args, k, None)), None)


def _report(e: DsmoeError) -> int:
    """Print ``e`` as the command's one line of error and return its exit code (errors.py's table)."""
    kind = "config error: " if isinstance(e, ConfigError) else ""
    print(f"dsmoe-jax: {kind}{e}", file=sys.stderr)
    return e.exit_code


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (errors.py's table: 0 when it finished)."""
    args = build_parser().parse_args(argv)
    if args.command in COMPILING and not args.no_compile_cache:
        runtime.enable_compilation_cache()
    drop_second_hand_reports()  # an error is one line: not also Orbax's logged tracebacks of it
    try:
        args.run(args)
    except DsmoeError as e:  # bad config or data, an unusable workdir, a diverged or interrupted run
        return _report(e)
    except OSError as e:  # a full or read-only disk, a missing permission or path: no traceback either
        return _report(storage_error(e, args.command, _output_path(args), OUTPUTS.get(args.command, "the output")))
    except KeyboardInterrupt:  # a Ctrl-C that was not asked to finish anything (training: the second one)
        resume = " (training: rerun with --resume to continue from the last checkpoint)" if args.command in (
            "train", "experiment") else ""
        print(f"dsmoe-jax: interrupted by Ctrl-C, stopped at once{resume}", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
