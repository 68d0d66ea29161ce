"""Local protocol stubs: real wire formats of the providers, on 127.0.0.1 only.

Each stub is a stdlib HTTP server in a thread of the test process.  The real agent
CLIs (installed at pinned versions, see tests/clients/versions.txt) are pointed at
them through their documented settings; the stub records every request so tests
can check what reached the provider (system prompt, model, tools).
"""
