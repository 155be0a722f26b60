"""The read-only admin console at /ui: static pages shipped in the package and the JSON feeds they read.

`console_routes` gives the routes; they sit beside /admin/* and check the admin key the same way.
"""

from gateway.http.console.activity import RecentActivity
from gateway.http.console.routes import console_routes

__all__ = ["RecentActivity", "console_routes"]
