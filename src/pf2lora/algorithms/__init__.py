"""The methods' server and client parts, one module each (the registry that names them is
:mod:`pf2lora.methods`). Nothing here knows which engine runs it or which task it trains."""
