"""Provider adapters: how one API's requests are built and its responses parsed.

An adapter holds no connection and no state; the client owns the HTTP side.
"""
