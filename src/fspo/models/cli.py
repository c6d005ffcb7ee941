"""The `fspo model` sub-commands: create and pretrain the embedded default model."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="The embedded default model: tokenizer + small Llama, made locally.", no_args_is_help=True
)


def _texts(corpus: str | None, sim_domain: str | None, seed: int) -> list[str]:
    from fspo.core.errors import UserError
    from fspo.models.corpus import sim_texts
    from fspo.models.default import read_corpus

    if (corpus is None) == (sim_domain is None):
        raise UserError("give exactly one of --corpus FILE or --sim-domain NAME")
    return read_corpus(corpus) if corpus else sim_texts(sim_domain or "", seed=seed)


@app.command("init")
def init(
    out: str = typer.Option(..., help="Model folder to create."),
    corpus: str | None = typer.Option(None, help="Plain-text corpus (documents separated by blank lines)."),
    sim_domain: str | None = typer.Option(None, help="Simulated domain to take text from, e.g. roleplay."),
    size: str = typer.Option("small", help="tiny | small | medium | base (fspo.models.default.SIZES)."),
    pretrain_steps: int = typer.Option(400, min=0, help="Causal-LM steps after init (0 = leave random)."),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="Replace the model in --out."),
) -> None:
    """Train a tokenizer on the corpus, create a small Llama, and pretrain it on the same text."""
    from rich.console import Console

    from fspo.core.outputs import OutputFolder
    from fspo.models.default import MODEL_FILES, init_model
    from fspo.models.pretrain import pretrain as run_pretrain

    params = {"corpus": corpus, "sim_domain": sim_domain, "size": size, "pretrain_steps": pretrain_steps,
              "seed": seed}  # fmt: skip
    folder = OutputFolder(out, "model init", params, MODEL_FILES, overwrite=overwrite, replaces_folder=True)
    texts = _texts(corpus, sim_domain, seed)
    console = Console()
    with folder.writing():
        path = init_model(out, texts, size=size, seed=seed)  # type: ignore[arg-type]
        console.print(f"created {path} ({len(texts)} documents)")
        summary = run_pretrain(path, texts, steps=pretrain_steps, seed=seed) if pretrain_steps else None
    if summary:
        console.print(
            f"pretrained {pretrain_steps} steps: loss {summary['first_loss']:.3f} → "
            f"{summary['final_loss']:.3f} "
            f"({summary['tokens_per_s']:.0f} tok/s, {summary['parameters'] / 1e6:.2f}M params)"
        )


@app.command("pretrain")
def pretrain(
    model: str = typer.Option(..., help="Model folder (updated in place, atomically)."),
    corpus: str | None = typer.Option(None),
    sim_domain: str | None = typer.Option(None),
    steps: int = typer.Option(400),
    lr: float = typer.Option(2e-3),
    batch_size: int = typer.Option(16),
    block_size: int = typer.Option(256),
    seed: int = typer.Option(0),
) -> None:
    """Plain causal-LM training on domain text, so the model 'speaks the domain' and the FSPO layout."""
    from rich.console import Console

    from fspo.models.pretrain import pretrain as run_pretrain

    texts = _texts(corpus, sim_domain, seed)
    s = run_pretrain(
        model, texts, steps=steps, lr=lr, batch_size=batch_size, block_size=block_size, seed=seed
    )
    Console().print(f"loss {s['first_loss']:.3f} → {s['final_loss']:.3f} ({s['tokens_per_s']:.0f} tok/s)")


def _mount_import() -> None:
    from fspo.models.gguf_import import register_import_command

    register_import_command(app)  # `fspo model import SOURCE`: a GGUF file -> a Hugging Face model folder


_mount_import()
