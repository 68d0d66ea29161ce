"""Front end for coding assistants: the MCP server (`parallel-dispatch mcp`) and
`init --claude`, which wires it and the `/parallel-dispatch` command into a project."""
