"""One module per tab: the handlers (on_*) and the tab's layout (*_tab)."""
