"""The DICOM node (`medrpn serve`): a PACS sends studies, medrpn sends its findings back.

* `medrpn.node.inbox`: received images on disk, per study, until their results are delivered;
* `medrpn.node.storage_scp`: the DICOM side (pynetdicom): C-ECHO, C-STORE of images into the inbox;
* `medrpn.node.delivery`: the SR and GSPS sent on by C-STORE;
* `medrpn.node.service`: the loop that analyses a study once it is quiet and delivers its results.
"""
