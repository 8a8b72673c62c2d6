"""The pluginhost web console: plugins, navigation, workflows, runs and the audit
log in a browser, and the same as a JSON API.

``create_app(host, flows=flows)`` returns a FastAPI app; ``pluginhost web`` serves it.
"""

from .app import create_app
from .auth import NoCredentials, WebAuth

__all__ = ["create_app", "WebAuth", "NoCredentials"]
