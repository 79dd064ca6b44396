class Notice: pass
class Subscriber: pass
