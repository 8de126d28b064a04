"""`vdevctl device-plugin`: the virtual NPUs of a FlexNPU daemon offered to the kubelet as an extended resource
(Kubernetes device plugin API v1beta1 over gRPC on unix sockets).

plugin.py   the servicer, the registration with the kubelet and the watch loop (state logic kept free of I/O)
command.py  the click command
api.proto   the kubelet's device plugin API (Apache-2.0, see LICENSE here; its header says where it comes from)

api_pb2.py, api_pb2.pyi and api_pb2_grpc.py are generated from api.proto and never edited by hand;
tests/unit/test_device_plugin.py checks they are what this command writes, run from the repository root
(it needs grpcio-tools, a test dependency):

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. tools/device_plugin/api.proto

The stubs require grpcio and protobuf at least as new as the grpcio-tools that wrote them (they check at import).
"""
