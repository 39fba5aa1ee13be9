"""The embedded toy world: ToyWorld and digits datasets, their writer, and the toy base model
(Stable Diffusion architecture, pretrained here on ToyWorld captions). Imports only leaves."""
