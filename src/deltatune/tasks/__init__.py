"""Tasks: what a run trains on and what it leaves for people, built on the task-free engine
(:mod:`deltatune.train`). Today one: image classification (:mod:`.image_classification`); a second task is a
new module here."""
