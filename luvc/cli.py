"""The ``luvc`` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="luvc: training-free visual-token compression for VLMs.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def main() -> None:
    """luvc: compress the visual tokens of vision-language models, training-free."""


@app.command()
def demo(
    model: str = typer.Option("qwen2-vl-demo", help="built-in config: qwen2-vl-demo or qwen2-vl-tiny"),
    schedule: str = typer.Option("luvc-default", help="preset name or YAML path"),
    image: str = typer.Option("astronaut", help="a scikit-image sample image"),
    size: int = typer.Option(448, help="image side in pixels (resized to about size x size)"),
    new_tokens: int = typer.Option(8, help="tokens to generate"),
    repeats: int = typer.Option(3, help="timed repeats (median reported)"),
) -> None:
    """Compile a random-weight Qwen2-VL and show tokens per layer, FLOPs and wall time before/after."""
    from luvc.demo import run_demo

    run_demo(model, schedule, image, size * size, new_tokens, repeats)


if __name__ == "__main__":
    app()
