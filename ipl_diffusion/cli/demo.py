"""`ipl demo`: a local web page (Gradio) to adapt a generator and compare before / after.

Upload source images or sample them, pick or type the target domain, run the adaptation
(Stage 1 + Stage 2, with a live progress bar), look at the source and adapted images side by
side, and download the adapted pipeline as a zip (the folder `save_pretrained` writes). It
runs offline on the embedded Shapes models (`--model` takes another pipeline folder). DiffAE
translates the source images; StyleGAN2 shows the source and adapted generators on the same
latents for sampled sources, and projects uploaded images. Needs Gradio:
`pip install "ipl-diffusion[demo]"`.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

from ipl_diffusion.errors import UserError

DESCRIPTION = __doc__.split("\n\n", 1)[1]
EPILOG = """examples:
  ipl demo                                  # http://127.0.0.1:7860, the embedded Shapes models
  ipl demo --model ipl-sketch/pipeline --port 8080
"""
BACKENDS = ("diffae", "stylegan2")
TILE = 192  # pixels per image in the before / after strips (Shapes images are 32 px)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="local web page: adapt, compare before / after, download the pipeline",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded Shapes models)")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="generator family (default: read from --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    return parser


def strip(images, tile: int = TILE, columns: int = 4):
    """PIL images -> one RGB grid of ``tile``-pixel squares (nearest-neighbour, so small images
    stay sharp when shown large), ``columns`` per row."""
    from PIL import Image

    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * tile, rows * tile), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), ((i % columns) * tile, (i // columns) * tile))
    return grid


class DemoSession:
    """The pipelines the page works with, loaded once per backend, and what one adaptation does.

    Args:
        model: a pipeline folder, or None for the embedded Shapes models of both backends.
        backend: its family (None: read from ``model``'s ``model_index.json``).
        device: torch device (default: cuda if available).
    """

    def __init__(self, model=None, backend=None, device=None):
        from ipl_diffusion.cli.adapt import detect_backend

        self.model = model
        self.backends = (detect_backend(backend, model),) if model is not None else BACKENDS
        self.device = device
        self._pipelines = {}

    def pipeline(self, backend):
        if backend not in self.backends:
            raise UserError(f"this demo serves {', '.join(self.backends)}, not {backend}")
        if backend not in self._pipelines:
            from ipl_diffusion.cli.adapt import load_pipeline

            self._pipelines[backend] = load_pipeline(backend, self.model, self.device)
        return self._pipelines[backend]

    def domains(self, backend):
        """Target labels to offer: the CLIP's known domains other than the source (a Shapes
        CLIP knows five); an open-vocabulary CLIP takes any typed label."""
        pipe = self.pipeline(backend)
        source = (pipe.config.source_label or "").lower()
        return [d for d in (pipe.config.get("known_domains") or []) if d.lower() != source]

    def sample_sources(self, backend, count: int, seed: int):
        """``count`` source-domain images as PIL: the Shapes renderer's photos for the embedded
        DiffAE (as ``ipl adapt`` uses), else the source model's own samples."""
        import torch

        pipe = self.pipeline(backend)
        generator = torch.Generator().manual_seed(seed)
        if backend == "stylegan2":
            return pipe(num_images=count, generator=generator, source=True).images
        if self.model is None:
            from ipl_diffusion.images import to_pil
            from ipl_diffusion.shapes import source_images

            return to_pil(source_images(count, seed=seed, resolution=pipe.image_size))
        return pipe.sample(num_images=count, generator=generator, source=True).images

    def adapt(self, backend, target, images, sampled_seed, options):
        """Adapt to ``target`` and return ``(adapted pipeline, before images, after images)``.

        ``images``: PIL source images (may be empty for StyleGAN2). ``sampled_seed``: the seed
        the StyleGAN2 sources were sampled with (their latents are re-drawn, so before / after
        share them exactly), or None for uploaded images (projected into W+ and re-synthesised).
        ``options``: ``adapt`` keywords (iterations, stage1_iterations, seed).
        """
        import torch

        pipe = self.pipeline(backend)
        if backend == "diffae":
            if len(images) < 2:
                raise UserError("give at least 2 source images (upload them or press Sample)")
            x = pipe.preprocess(images)
            adapted = pipe.adapt(target, images=x, progress=True, **options)
            return adapted, images, adapted(x).images
        adapted = pipe.adapt(target, progress=True, **options)
        if images and sampled_seed is None:
            return adapted, images, adapted.translate(images, num_steps=100)
        count = len(images) or 8
        z = torch.randn((count, pipe.source_generator.style_dim), generator=torch.Generator().manual_seed(sampled_seed or 0))
        return adapted, pipe(latents=z, source=True).images, adapted(latents=z).images


def pipeline_zip(adapted, target: str) -> str:
    """Save ``adapted`` and zip the folder; returns the zip's path (in a new temporary folder)."""
    folder = Path(tempfile.mkdtemp(prefix="ipl-demo-"))
    name = f"ipl-{'-'.join(target.lower().split()) or 'adapted'}"
    adapted.save_pretrained(folder / name)
    return shutil.make_archive(str(folder / name), "zip", root_dir=folder, base_dir=name)


def run_summary(adapted) -> str:
    """One Markdown line on the finished run (Stage 2 loss and time)."""
    summary = adapted.config.get("run_summary") or {}
    text = f"**{adapted.config.source_label} → {adapted.config.target_label}**"
    if summary:
        text += (
            f": Stage 2 ran {summary['stage2_iterations']} iterations, loss {summary['stage2_loss_first']:.3f} → "
            f"{summary['stage2_loss_final']:.3f}"
        )
        if "stage2_seconds" in summary:
            text += f" in {summary['stage2_seconds']:.0f} s"
    return text + ". Download the pipeline below; it loads with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`."


def _gallery_images(value):
    """Gradio gallery value -> PIL images (entries are images or ``(image, caption)``)."""
    return [entry[0] if isinstance(entry, (tuple, list)) else entry for entry in (value or [])]


def build_app(session):
    """The page (a ``gradio.Blocks``) for ``session`` (:class:`DemoSession`). Element ids:
    ``backend``, ``domain``, ``sources``, ``count``, ``sample``, ``iterations``, ``stage1``,
    ``seed``, ``adapt``, ``status``, ``before``, ``after``, ``download``."""
    import gradio as gr

    def defaults(backend):
        recommended = session.pipeline(backend).config.get("adapt_defaults") or {}
        return int(recommended.get("iterations", 60)), int(recommended.get("stage1_iterations", 100))

    def on_backend(backend):
        choices, (iterations, stage1) = session.domains(backend), defaults(backend)
        domain = gr.Dropdown(choices=choices, value=choices[0] if choices else None)
        return domain, iterations, stage1, None, None

    def on_sample(backend, count, seed):
        return session.sample_sources(backend, int(count), int(seed)), int(seed)

    def on_adapt(backend, target, sources, sampled_seed, iterations, stage1, seed, progress=gr.Progress(track_tqdm=True)):
        target = (target or "").strip()
        if not target:
            raise gr.Error("pick or type a target domain")
        options = dict(iterations=int(iterations), stage1_iterations=int(stage1), seed=int(seed))
        try:
            adapted, before, after = session.adapt(backend, target, _gallery_images(sources), sampled_seed, options)
        except UserError as err:  # a refusal the user can act on; anything else is a bug, with its traceback
            raise gr.Error(str(err)) from err
        return strip(before), strip(after), pipeline_zip(adapted, target), run_summary(adapted)

    first = session.backends[0]
    domains, (iterations0, stage10) = session.domains(first), defaults(first)
    with gr.Blocks(title="ipl-diffusion demo", analytics_enabled=False) as app:
        gr.Markdown(
            "## Zero-shot domain adaptation with Image-specific Prompt Learning\n"
            "Upload source images or sample them, pick or type a target domain, and adapt. "
            "Only CLIP and the two domain labels guide the adaptation: no target images."
        )
        sampled = gr.State(None)  # seed of sampled sources; None once images are uploaded
        with gr.Row():
            backend = gr.Radio(list(session.backends), value=first, label="Generator", elem_id="backend")
            domain = gr.Dropdown(domains, value=domains[0] if domains else None, allow_custom_value=True,
                                 label="Target domain (pick or type)", elem_id="domain")
        sources = gr.Gallery(label="Source images (upload, or sample them)", type="pil", format="png", interactive=True,
                             columns=8, height=220, elem_id="sources")
        with gr.Row():
            count = gr.Slider(2, 16, value=8, step=1, label="Images to sample", elem_id="count")
            seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
            sample = gr.Button("Sample source images", elem_id="sample")
        with gr.Accordion("Iterations", open=False):
            iterations = gr.Slider(1, 300, value=iterations0, step=1, label="Stage 2 (fine-tuning)", elem_id="iterations")
            stage1 = gr.Slider(1, 300, value=stage10, step=1, label="Stage 1 (prompt learning)", elem_id="stage1")
        adapt = gr.Button("Adapt", variant="primary", elem_id="adapt")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            before = gr.Image(label="Before: source", type="pil", height=440, interactive=False, elem_id="before")
            after = gr.Image(label="After: adapted", type="pil", height=440, interactive=False, elem_id="after")
        download = gr.File(label="Adapted pipeline (zip of the save_pretrained folder)", interactive=False, elem_id="download")

        backend.change(on_backend, backend, [domain, iterations, stage1, sources, sampled])
        sample.click(on_sample, [backend, count, seed], [sources, sampled])
        sources.upload(lambda: None, None, sampled)
        adapt.click(on_adapt, [backend, domain, sources, sampled, iterations, stage1, seed], [before, after, download, status])
    return app


def launch(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve ``app`` on ``host:port`` without reaching the network: no analytics, no share
    link, no web fonts (the theme uses the browser's own), no server-side rendering (Node)."""
    import gradio as gr

    theme = gr.themes.Base(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return app.queue().launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=not block, theme=theme,
        show_error=True, quiet=not block, ssr_mode=False, footer_links=[],
    )


def run(args) -> int:
    import os

    # Before gradio is imported: it reads this at import time and would otherwise try to
    # report usage and check for a newer version over the network.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError('ipl demo needs Gradio: pip install "ipl-diffusion[demo]" (or pip install gradio)') from None
    session = DemoSession(args.model, args.backend, args.device)
    print(f"ipl demo: serving on http://{args.host}:{args.port} (Ctrl+C stops)")
    launch(build_app(session), args.host, args.port, block=True)
    return 0
