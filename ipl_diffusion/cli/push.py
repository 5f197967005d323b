"""`ipl push`: upload an adapted pipeline to the Hugging Face Hub.

Uploads the pipeline folder's weights (safetensors) and configs, a model card (source and
target labels, base model, prompt scheme, the run's loss and options, the before/after
sample grid) and the code files of diffusers' custom-pipeline layout, so that others can
load it with `DiffusionPipeline.from_pretrained("<repo-id>", trust_remote_code=True)` or
`IPLPipeline.from_pretrained("<repo-id>")` (both with `pip install ipl-diffusion`). Log in
first with `hf auth login` or pass `--token`.
"""

import argparse

DESCRIPTION = __doc__.split("\n\n", 1)[1]
EPILOG = """examples:
  ipl push --model ipl-sketch/pipeline --repo-id me/shapes-photo-to-sketch
  ipl push --model out/pipeline --repo-id me/ffhq-wall-painting --private
"""


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "push",
        help="upload an adapted pipeline with a model card to the Hub",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="adapted pipeline folder (from `ipl adapt`)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. username/shapes-photo-to-sketch")
    parser.add_argument(
        "--backend",
        choices=("diffae", "stylegan2"),
        default=None,
        help="generator family (default: read from the --model folder)",
    )
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in user's)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    return parser


def run(args) -> int:
    from pathlib import Path

    from ipl_diffusion.errors import UserFileNotFoundError

    if not Path(args.model).is_dir():
        raise UserFileNotFoundError(f"--model {args.model} is not a pipeline folder")
    from ipl_diffusion.cli.adapt import detect_backend

    if detect_backend(args.backend, args.model) == "stylegan2":
        from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline as cls
    else:
        from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline as cls
    pipe = cls.from_pretrained(args.model)
    url = pipe.push_to_hub(
        args.repo_id, private=args.private or None, token=args.token, commit_message=args.commit_message
    )
    print(f"pushed {args.model} to {args.repo_id}" + (f": {url}" if url else ""))
    return 0
