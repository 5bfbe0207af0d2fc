"""What builds on a store: pipelines, the pytest-xdist plugin, the LangGraph saver."""
