from setuptools import find_packages, setup

setup(
    name="zeromesh",
    version="0.1.0",
    description="A ZeroMQ peer-to-peer executor mesh for Python",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mesh", "mesh.*", "executor", "executor.*", "client", "client.*"]),
    package_data={"mesh": ["py.typed"], "executor": ["py.typed", "protos/*.proto", "protos/LICENSE", "protos/NOTICE"],
                  "client": ["py.typed"],
                  "client.dashboard": ["static/*.js", "static/*.css", "static/*.LICENSE", "templates/*.html"]},
    python_requires=">=3.9",
    install_requires=[
        "pyzmq>=25",
        "msgpack>=1.0",
        "cloudpickle>=2.0",
        "uvloop>=0.17; sys_platform != 'win32'",
        "click>=8.0",
        "PyYAML>=6.0",
        "rich>=13",
        "croniter>=1.3",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "mypy>=1.5", "types-PyYAML",
                 "numpy", "matplotlib",             # numpy and matplotlib: examples/flows
                 "protobuf>=3.20",                  # protobuf: the Statefun HTTP handler (the statefun extra)
                 "starlette>=0.37", "uvicorn>=0.29",  # the dashboard extra
                 "selenium>=4.10"],                 # the dashboard's browser tests (Debian's chromium and chromedriver)
        "examples": ["numpy", "matplotlib"],
        "statefun": ["protobuf>=3.20"],                       # executor.RequestReplyHandler (Flink Statefun)
        "dashboard": ["starlette>=0.37", "uvicorn>=0.29"],   # zmesh dashboard (client/dashboard)
        "bench": ["ray", "dask[distributed]"],
    },
    entry_points={"console_scripts": ["zmesh=client.cli:main"]},
)
