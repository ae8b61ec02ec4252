"""POST /distorch/convert: the workflow converter (distorch/convert.py) behind the frontend's
"Convert loaders to DisTorch" canvas menu action (web/js/convert_loaders.js), so the mapping exists once."""

import logging

from aiohttp import web

from ..distorch.convert import ConvertError, convert_workflow
from .devices import machine

logger = logging.getLogger("distorch.nodes")

ROUTE = "/distorch/convert"


def register_convert_route(routes: web.RouteTableDef) -> None:
    """Adds the route to ComfyUI's table (once; ComfyUI serves it, and under /api, after the packs load)."""
    if any(getattr(route, "path", None) == ROUTE for route in routes):
        return
    routes.post(ROUTE)(convert)


async def convert(request: web.Request) -> web.Response:
    """Body {"workflow": <UI or API workflow>} → {"workflow", "changes", "skipped", "report"}; 400 with {"error"}."""
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "the request body is not JSON"}, status=400)
    try:
        result = convert_workflow(body.get("workflow") if isinstance(body, dict) else None, machine())
    except ConvertError as error:
        return web.json_response({"error": str(error)}, status=400)
    logger.info("distorch: converted a workflow in the frontend\n%s", result.report())
    return web.json_response({"workflow": result.workflow, "changes": [str(c) for c in result.changes],
                              "skipped": [str(s) for s in result.skipped], "report": result.report()})
