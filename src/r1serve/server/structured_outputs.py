"""What a chat request constrains its output to: response_format, or the tool calls that
tool_choice "required" or a named function demands (in the model's own tool-call format, or
the generic one of generic_tools.py for a model whose template has none).

Every schema is compiled here, before any work starts, so one that the grammar library
cannot take is a 400 naming its field. Under tool_choice "auto" the model may answer in
text or call tools; a call it opens is held to the grammar from its opening marker on (a
lazy grammar), so every call parses and validates.
"""
from __future__ import annotations

from r1serve.engine.grammar import check_grammar
from r1serve.errors import InvalidRequestError
from r1serve.sampling_params import StructuredOutputsParams
from r1serve.server.errors import APIError
from r1serve.server.protocol import ChatCompletionRequest
from r1serve.server.served_model import ServedModel
from r1serve.tool_calls import ToolSpec, closed_schema


def structured_outputs(model: ServedModel, req: ChatCompletionRequest) -> StructuredOutputsParams | None:
    tools = _checked_tools(model, req)
    mode = req.tool_mode
    if mode in ("required", "named"):
        if mode == "named":
            tools = [t for t in tools if t.name == req.tool_choice.function.name]
        # A named function is called once, as OpenAI does; "required" calls one or more.
        parallel = mode == "required" and req.parallel_tool_calls is not False
        grammar = model.call_format.grammar(tools, parallel, model.engine.tokenizer.token_to_id)
        return _compiled(StructuredOutputsParams(grammar=grammar), "tool_choice")
    fmt = req.response_format
    if mode == "auto" and tools and (fmt is None or fmt.type == "text"):
        lazy = model.call_format.lazy_grammar(tools, req.parallel_tool_calls is not False,
                                              model.engine.tokenizer.token_to_id)
        return _compiled(StructuredOutputsParams(grammar=lazy), "tools")
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    schema = fmt.json_schema.schema_
    if fmt.json_schema.strict and schema is not None:
        schema = closed_schema(schema)
    spec = StructuredOutputsParams(json=schema) if schema is not None else StructuredOutputsParams(json_object=True)
    return _compiled(spec, "response_format.json_schema.schema")


def banned_markers(model: ServedModel, req: ChatCompletionRequest) -> dict[int, float] | None:
    """With tools but tool_choice "none", a model that still tries to call one must not put
    the call's markup in the content: the marker that opens calls is banned where it is one token."""
    fmt = model.tool_format
    if not req.tools or req.tool_mode != "none" or fmt is None:
        return None
    ids = [model.engine.tokenizer.token_to_id(m) for m in (fmt.block_begin, fmt.call_begin) if m]
    return {i: -100.0 for i in ids if i is not None} or None


def _checked_tools(model: ServedModel, req: ChatCompletionRequest) -> list[ToolSpec]:
    mode = req.tool_mode
    if not req.tools:  # (required or a named function without tools is refused by the protocol)
        return []
    names = [t.function.name for t in req.tools]
    if mode == "named" and req.tool_choice.function.name not in names:
        raise APIError(400, f"tool_choice names the function {req.tool_choice.function.name!r}, which is not "
                            f"among the tools ({', '.join(names)})", param="tool_choice")
    specs = [ToolSpec.from_openai(t.model_dump()) for t in req.tools]
    for i, spec in enumerate(specs):
        _compiled(StructuredOutputsParams(json=spec.parameters), f"tools[{i}].function.parameters")
    return specs


def _compiled(spec: StructuredOutputsParams, param: str) -> StructuredOutputsParams:
    try:
        check_grammar(spec)
    except InvalidRequestError as exc:
        message = str(exc).replace(f"structured_outputs.{spec.kind}", param)
        raise APIError(400, message, param=param) from exc
    return spec

