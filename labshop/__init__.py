"""The local chaos lab's parts: the shop (shop.py, run as a script), its fault injector
(faults.py) and metric set (metrics-lab.yaml). lab.py drives them."""
