"""The web app (`metaportrait app`): `jobs` does the work without any web framework, `ui` lays out the Gradio
page over it, `server` starts it in a temporary run folder."""
