from dataclasses import dataclass

from executor import Instance


@dataclass
class EchoRequest:
    text: str


@dataclass
class EchoResponse:
    text: str
    count: int


ins = Instance()


@ins.entrypoint
def echo(req: EchoRequest) -> EchoResponse:
    history = ins.context() or []
    history.append(req.text)
    ins.update_context(history)
    return EchoResponse(text=req.text.upper(), count=len(history))


if __name__ == "__main__":
    ins.run()
