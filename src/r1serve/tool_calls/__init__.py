"""Tool calls in each model family's own format: parsing (streamed or whole) and the grammar
that enforces a call (formats.py, parser.py)."""
from r1serve.tool_calls.formats import FORMATS, PARSERS, ToolCallFormat, ToolSpec, closed_schema, detect_format
from r1serve.tool_calls.parser import CallDelta, ParsedCall, ToolCallParser, ToolDelta, parse_tool_calls

__all__ = ["FORMATS", "PARSERS", "CallDelta", "ParsedCall", "ToolCallFormat", "ToolCallParser", "ToolDelta",
           "ToolSpec", "closed_schema", "detect_format", "parse_tool_calls"]
