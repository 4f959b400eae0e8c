# -*- coding: utf-8 -*-
"""pip source arguments for a stack: the inventory's overrides, else the lock flavor's settings."""

from __future__ import annotations

from ansible_collections.llamafleet.cluster.plugins.plugin_utils.project import PROJECT_DIR  # noqa: F401

from llamafleet.lock import PipSource, resolve_dict


def pip_args(stack, index_url="", extra_index_urls=None, find_links=None):
    base = resolve_dict(stack).pip
    return PipSource(index_url or base.index_url, tuple(extra_index_urls or base.extra_index_urls),
                     tuple(find_links or base.find_links)).args()


class FilterModule:
    def filters(self):
        return {"pip_args": pip_args}
