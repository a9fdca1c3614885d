"""Start an EmbeddedServer, print its pid as JSON, then crash without stopping it.

The atexit hook of dedupcall.embedded must still kill the server.
"""

import json

from dedupcall.embedded import EmbeddedServer

server = EmbeddedServer()
server.start()
print(json.dumps({"pid": server.pid, "data_dir": server.data_dir}), flush=True)
raise RuntimeError("crash on purpose, server still running")
