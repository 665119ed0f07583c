"""A small third-party plugin: one option, one route, and a refusal before generation."""

from litestar import Request, get

from forgellm import ApiError, Option, hookimpl


@get("/testplugin/hello")
async def hello(request: Request) -> dict:
    server = request.app.state.server
    return {"plugin": "testplugin", "model_loaded": server.models.state.loaded}


@hookimpl
def register_options(register):
    register(Option("testplugin_banned_word", "Prompts holding this word are refused.", default="forbidden"))


@hookimpl
def register_routes(register, server):
    register(hello)


@hookimpl
def before_generate(identity, request, job, server):
    if server.settings.testplugin_banned_word in job.prompt_text:
        raise ApiError(422, "testplugin refuses this prompt", code="refused")
