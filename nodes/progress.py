"""Staging progress on the DisTorch loader node's own progress bar (ComfyUI's `comfy.utils.ProgressBar`).

Staging (copying the streamed blocks into pinned RAM or a donor GPU) runs when ComfyUI first loads
the model for a node that uses it, a KSampler or a text encode, not in the loader's `execute`. The
bar still goes to the loader: the loader records its node id on the model's state, and
`ProgressBar(node_id=...)` addresses any node of the running prompt; the frontend draws a bar on
every node in the "running" state. The loader is marked finished once staging is done, so its bar
does not linger while the sampler runs. When the loader is not part of the running prompt (its model
came out of a cache under another graph), the bar goes to the node being executed, as any other
ProgressBar would.

ComfyUI's progress hook raises when the user interrupts: staging stops between two blocks, and the
streamer stays consistent (distorch.streamer `open`).
"""

import comfy.utils

try:  # ComfyUI 0.3.4x+: per-node progress states and the executing node's context
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context
except ImportError:  # pragma: no cover - older cores: the bar goes to the executing node
    get_progress_state = get_executing_context = None

_UNIT = 1024 * 1024  # the bar counts MiB, which also reads well in the terminal's progress bar


def executing_node_id() -> str | None:
    """The id of the node whose `execute` is running now (the loader, when called from it)."""
    context = get_executing_context() if get_executing_context is not None else None
    return None if context is None else str(context.node_id)


class StagingProgressBar:
    """A `distorch.streamer.StagingProgress` that drives ComfyUI's progress bar of one node."""

    def __init__(self, loader_node: str | None):
        self.node = loader_node if in_running_prompt(loader_node) else None
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        steps = max(1, -(-total // _UNIT))
        if self._bar is None:
            self._bar = comfy.utils.ProgressBar(steps, node_id=self.node)
        self._bar.update_absolute(steps if done >= total else done // _UNIT, steps)
        if done >= total and self.node is not None:
            get_progress_state().finish_progress(self.node)


def in_running_prompt(node: str | None) -> bool:
    """Whether `node` is a node of the prompt running now (a cached model's loader may belong to another one)."""
    if node is None or get_progress_state is None:
        return False
    dynprompt = getattr(get_progress_state(), "dynprompt", None)
    return dynprompt is not None and dynprompt.has_node(node)
